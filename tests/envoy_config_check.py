"""Reads each Envoy config file named on the command line as Envoy's v3 Bootstrap message,
with the messages generated from Envoy's own protos (xds-protos): every field must exist and
have its type, and every typed_config must name a known extension and fit its message. Run
by tests/authz_grpc.rs. Prints one line per file; exits non-zero at the first that fails.

This checks the configuration's shape against Envoy's API, not what Envoy itself would
validate at startup (cluster references, listener conflicts).
"""

import sys

import yaml
from google.protobuf import json_format
from envoy.config.bootstrap.v3 import bootstrap_pb2

# The extensions the configs use: importing them registers their messages for typed_config.
import envoy.extensions.filters.http.ext_authz.v3.ext_authz_pb2  # noqa: F401
import envoy.extensions.filters.http.router.v3.router_pb2  # noqa: F401
import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2  # noqa: F401
import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401

for path in sys.argv[1:]:
    with open(path) as f:
        config = yaml.safe_load(f)
    bootstrap = json_format.ParseDict(config, bootstrap_pb2.Bootstrap())
    print(f"{path}: a valid Bootstrap with {len(bootstrap.static_resources.clusters)} clusters")
