"""A gRPC client of keygate's decision endpoint, as Envoy's ext_authz filter calls it: grpcio
and the messages generated from Envoy's own v3 protos (the xds-protos package). Run by
tests/authz_grpc.rs: it reads {"addr": "HOST:PORT", "cases": [...]} as JSON on stdin and prints
one JSON result per case, in order, as a JSON array.

A case is {"name": ..., "kind": ...} with, by kind:
  check       a CheckRequest for attributes.request.http {method, path, host, headers};
              "raw": true sends the headers in header_map (raw_value) instead of the map;
              "metadata": [[k, v], ...] adds call metadata; "gzip": true compresses the call
  empty       a CheckRequest without attributes
  bytes       the bytes of "hex" sent as the message, unparsed
  size        "n" bytes sent as the message
  method      an empty message to another method, "path"

A result is {"name", "code": the call's status code, "details", "response": the CheckResponse
as {"status": {code, message}, "which": the oneof's field, "ok": {...}, "denied": {...}} or
null when the call failed}.
"""

import json
import sys

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

CHECK = "/envoy.service.auth.v3.Authorization/Check"
TIMEOUT = 20


def check_request(case):
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=case["method"], path=case["path"], host=case["host"], protocol="HTTP/2"
    )
    headers = case.get("headers", {})
    if case.get("raw"):
        for k, v in headers.items():
            http.header_map.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    else:
        for k, v in headers.items():
            http.headers[k] = v
    req = external_auth_pb2.CheckRequest()
    req.attributes.request.http.CopyFrom(http)
    return req


def options(opts):
    return [
        {
            "key": o.header.key,
            "value": o.header.value or o.header.raw_value.decode(),
            "append_action": base_pb2.HeaderValueOption.HeaderAppendAction.Name(o.append_action),
        }
        for o in opts
    ]


def response(resp):
    which = resp.WhichOneof("http_response")
    out = {
        "status": {"code": resp.status.code, "message": resp.status.message},
        "which": which,
    }
    if which == "ok_response":
        ok = resp.ok_response
        out["ok"] = {
            "headers": options(ok.headers),
            "headers_to_remove": list(ok.headers_to_remove),
        }
    elif which == "denied_response":
        d = resp.denied_response
        out["denied"] = {
            "status": d.status.code,
            "headers": options(d.headers),
            "body": d.body,
        }
    return out


def run(channel, case):
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    raw = lambda path: channel.unary_unary(  # noqa: E731
        path, request_serializer=None, response_deserializer=None
    )
    kind = case["kind"]
    metadata = [tuple(m) for m in case.get("metadata", [])]
    if kind == "check":
        compression = grpc.Compression.Gzip if case.get("gzip") else None
        resp = stub.Check(
            check_request(case), timeout=TIMEOUT, metadata=metadata, compression=compression
        )
        return response(resp)
    if kind == "empty":
        return response(stub.Check(external_auth_pb2.CheckRequest(), timeout=TIMEOUT))
    if kind == "bytes":
        raw(CHECK)(bytes.fromhex(case["hex"]), timeout=TIMEOUT)
        return "answered"
    if kind == "size":
        raw(CHECK)(b"\x0a" * case["n"], timeout=TIMEOUT)
        return "answered"
    if kind == "method":
        raw(case["path"])(b"", timeout=TIMEOUT)
        return "answered"
    raise ValueError(f"unknown case kind {kind!r}")


def main():
    spec = json.load(sys.stdin)
    results = []
    with grpc.insecure_channel(spec["addr"]) as channel:
        for case in spec["cases"]:
            result = {"name": case["name"], "code": 0, "details": "", "response": None}
            try:
                resp = run(channel, case)
                result["response"] = resp if isinstance(resp, dict) else None
            except grpc.RpcError as err:
                result["code"] = err.code().value[0]
                result["details"] = err.details() or ""
            results.append(result)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
