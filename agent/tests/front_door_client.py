#!/usr/bin/env python3
"""A Workload API client on gRPC C-core (Python grpcio), for agent/tests/front_door.rs.

Usage: front_door_client.py MODE TARGET CALLS CONCURRENCY
  MODE "calls": CALLS sequential FetchJWTSVID calls on one channel (so one connection, and the
       :authority travels through the HPACK dynamic table after the first call), then CONCURRENCY
       concurrent unary calls and CONCURRENCY concurrent FetchX509SVID streams, then one call
       without the workload.spiffe.io header (must be INVALID_ARGUMENT). The test server echoes
       the caller's uid, gid and pid, which must be ours. Prints a JSON summary.
  MODE "expect-failure": one call, which must fail (used against a plain tonic server, to show
       what the front door fixes). Prints the status.

The generated workload_pb2 / workload_pb2_grpc modules must be on PYTHONPATH.
"""

import json
import os
import sys
import threading

import grpc

import workload_pb2
import workload_pb2_grpc

METADATA = (("workload.spiffe.io", "true"),)
TIMEOUT = 20


def check(condition, what):
    if not condition:
        print(json.dumps({"error": what}))
        sys.exit(1)


def main():
    mode, target, calls, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    pid = os.getpid()
    expected = f"uid={os.geteuid()};gid={os.getegid()};pid={pid}"

    with grpc.insecure_channel(target) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)

        if mode == "expect-failure":
            try:
                stub.FetchJWTSVID(
                    workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=METADATA, timeout=TIMEOUT
                )
            except grpc.RpcError as error:
                print(json.dumps({"failed": True, "code": error.code().name, "details": error.details()}))
                return 0
            print(json.dumps({"failed": False}))
            return 1

        for i in range(calls):
            response = stub.FetchJWTSVID(
                workload_pb2.JWTSVIDRequest(audience=[f"aud-{i}"]), metadata=METADATA, timeout=TIMEOUT
            )
            check(response.svids[0].svid == expected, f"call {i}: {response.svids[0].svid!r} != {expected!r}")

        pending = [
            stub.FetchJWTSVID.future(
                workload_pb2.JWTSVIDRequest(audience=[f"concurrent-{i}"]), metadata=METADATA, timeout=TIMEOUT
            )
            for i in range(concurrency)
        ]
        for i, future in enumerate(pending):
            check(future.result().svids[0].svid == expected, f"concurrent call {i}")

        results = []

        def stream():
            responses = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=METADATA, timeout=TIMEOUT)
            first = next(responses)
            results.append(first.svids[0].hint == expected)
            responses.cancel()

        threads = [threading.Thread(target=stream) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        check(len(results) == concurrency and all(results), f"streams: {results}")

        try:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), timeout=TIMEOUT)
            check(False, "a call without the security header succeeded")
        except grpc.RpcError as error:
            check(error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"no header: {error.code()}")

    print(json.dumps({"pid": pid, "uid": os.geteuid(), "calls": calls + 2 * concurrency}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
