"""A Python client generated with grpcio-tools from proto/ ingests and subscribes against a
running cluster: proof that the protos work outside Rust.

    python client_check.py --proto-dir proto --addr 127.0.0.1:7400 [--addr ...] --seed N

Sends sum events (idempotent producer, one retry with the same seqs to show deduplication),
then follows Subscribe on every shard until the outputs add up to what was acknowledged.
Exits 0 on success; prints what differs otherwise.
"""

import argparse
import importlib
import random
import sys
import tempfile
import time


def generate(proto_dir, out_dir):
    from grpc_tools import protoc  # noqa: PLC0415 (import after the venv check)
    import grpc_tools

    include = grpc_tools.__path__[0] + "/_proto"
    args = ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            f"{proto_dir}/coalesce/v1/coalesce.proto"]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out_dir)
    return (importlib.import_module("coalesce.v1.coalesce_pb2"), importlib.import_module("coalesce.v1.coalesce_pb2_grpc"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--addr", action="append", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--stream", default="sums")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    import grpc

    out = tempfile.mkdtemp(prefix="coalesce-py-")
    pb, rpc = generate(args.proto_dir, out)
    stub = rpc.CoalesceStub(grpc.insecure_channel(args.addr[0]))

    status = stub.Status(pb.StatusRequest(), timeout=5)
    shards = status.shards
    print(f"cluster {status.cluster}: {shards} shards, asking {status.node}")

    producer = rng.getrandbits(63) | 1
    expected = {}
    seq = 0
    for _ in range(10):
        events = []
        for _ in range(100):
            seq += 1
            key, v = f"py-{rng.randrange(200)}", rng.randrange(-20, 20)
            events.append(pb.Event(stream=args.stream, key=key, value=pb.Value(int=v), producer_seq=seq))
            expected[key] = expected.get(key, 0) + v
        req = pb.IngestRequest(producer_id=producer, events=events)
        resp = stub.Ingest(req, timeout=10)
        bad = [s for s in resp.statuses if s.code != pb.EVENT_CODE_OK]
        if bad:
            sys.exit(f"events not acknowledged: {bad[:3]}")
        # A retry of the same request is acknowledged as DUPLICATE and not applied again.
        again = stub.Ingest(req, timeout=10)
        if any(s.code != pb.EVENT_CODE_DUPLICATE for s in again.statuses):
            sys.exit(f"a retried request was not deduplicated: {again.statuses[:3]}")

    # Errors name the field and the event index.
    try:
        resp = stub.Ingest(pb.IngestRequest(events=[pb.Event(stream="no-such-stream", key="k", value=pb.Value(int=1))]), timeout=5)
        s = resp.statuses[0]
        if s.code != pb.EVENT_CODE_NOT_FOUND or "events[0]" not in s.message:
            sys.exit(f"unknown stream: unexpected status {s}")
    except grpc.RpcError as e:
        sys.exit(f"unknown stream: the call itself failed: {e}")

    got = {}
    deadline = time.time() + 30
    want = {k: v for k, v in expected.items() if v != 0}
    # Every shard's outputs from the start (this node replicates all of them).
    stream = stub.Subscribe(pb.SubscribeRequest(consumer="python", shards=[], from_seq={s: 0 for s in range(shards)}), timeout=30)
    try:
        for batch in stream:
            for o in batch.outputs:
                if o.stream == args.stream:
                    got[o.key] = got.get(o.key, 0) + int(o.value_json)
            if {k: v for k, v in got.items() if v != 0} == want:
                print(f"ok: {len(want)} keys, totals match")
                stream.cancel()
                return
            if time.time() > deadline:
                break
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            sys.exit(f"subscribe failed: {e}")
    missing = {k: (v, got.get(k, 0)) for k, v in want.items() if got.get(k, 0) != v}
    sys.exit(f"totals differ for {len(missing)} keys, e.g. {list(missing.items())[:5]}")


if __name__ == "__main__":
    main()
