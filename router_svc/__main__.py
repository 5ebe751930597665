"""python -m router_svc: run the router service (started by `herd up` or a Deployment)."""
import argparse
import logging
import os

from llama4.dtypes import DTYPE_NAMES, torch_dtype
from plumbing.grpc_server import MAX_MESSAGE_BYTES
from plumbing.lifecycle import serve_until_signalled
from router_svc.server import serve


def main() -> None:
    ap = argparse.ArgumentParser(prog="router_svc")
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cluster", default="herd")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES, help="gRPC message cap, each way")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    redis_url = os.environ["HERD_REDIS_URL"]  # carries the password: environment, not argv
    server, port, _ = serve(args.model, torch_dtype(args.dtype), redis_url, args.cluster, args.host, args.port,
                            max_message_bytes=args.max_message_bytes)
    print(f"ROUTER_LISTENING {args.host}:{port}", flush=True)
    serve_until_signalled(server)


if __name__ == "__main__":
    main()
