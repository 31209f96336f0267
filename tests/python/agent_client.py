#!/usr/bin/env python3
"""A Workload API client on gRPC C-core (Python grpcio), run by tests/tests/agent_python_client.rs
against the real sigil-agent.

Usage: agent_client.py unix:///path/to/api.sock AUDIENCE

Fetches the X509-SVID (first stream message), the X.509 bundles, a JWT-SVID for AUDIENCE, the JWT
bundles, validates the JWT-SVID, and prints one JSON summary (DER as hex) for the test to check.
The generated workload_pb2 / workload_pb2_grpc modules must be on PYTHONPATH.
"""

import json
import sys

import grpc

import workload_pb2
import workload_pb2_grpc

METADATA = (("workload.spiffe.io", "true"),)
TIMEOUT = 20


def main():
    target, audience = sys.argv[1], sys.argv[2]
    with grpc.insecure_channel(target) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        x509 = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=METADATA, timeout=TIMEOUT))
        bundles = next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=METADATA, timeout=TIMEOUT))
        jwt = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=[audience]), metadata=METADATA, timeout=TIMEOUT)
        jwt_bundles = next(stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=METADATA, timeout=TIMEOUT))
        validated = stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=jwt.svids[0].svid),
            metadata=METADATA,
            timeout=TIMEOUT,
        )
        try:
            stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=TIMEOUT).next()
            missing_header = "OK"
        except grpc.RpcError as error:
            missing_header = error.code().name
    print(json.dumps({
        "spiffe_id": x509.svids[0].spiffe_id,
        "x509_svid": x509.svids[0].x509_svid.hex(),
        "x509_svid_key": x509.svids[0].x509_svid_key.hex(),
        "bundle": x509.svids[0].bundle.hex(),
        "bundle_keys": sorted(bundles.bundles.keys()),
        "jwt_spiffe_id": jwt.svids[0].spiffe_id,
        "jwt_bundle_keys": sorted(jwt_bundles.bundles.keys()),
        "validated_spiffe_id": validated.spiffe_id,
        "missing_header": missing_header,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
