"""Schemathesis hooks for keygate's admin API fuzz test (tests/openapi_fuzz.rs).

Two rules of the API depend on state a static document cannot express, and only these two are
adjusted here; every check stays on:

- An expiry must be in the future. A generated `expires_at` that already passed is moved to the
  same day and time of the year 2999, so schema-valid requests stay valid.
- The fuzzer authenticates with one admin key. Revoking that key (its id is listed by
  GET /v1/keys, and the stateful phase follows such links) would leave every later request
  unauthenticated and test nothing, so no case revokes it.
"""

import datetime
import os

import schemathesis

ADMIN_KEY_ID = os.environ.get("KEYGATE_FUZZ_ADMIN_ID", "")


def _future(value):
    try:
        at = datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError):
        return value
    if at > datetime.datetime.utcnow() + datetime.timedelta(minutes=5):
        return value
    try:
        return at.replace(year=2999).strftime("%Y-%m-%dT%H:%M:%SZ")
    except ValueError:  # 29 February
        return at.replace(year=2999, day=28).strftime("%Y-%m-%dT%H:%M:%SZ")


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict) and isinstance(body.get("expires_at"), str):
        body = dict(body, expires_at=_future(body["expires_at"]))
    return body


@schemathesis.hook
def filter_case(context, case):
    params = case.path_parameters or {}
    return not (ADMIN_KEY_ID and params.get("id") == ADMIN_KEY_ID and case.method.upper() != "GET")
