"""python -m router_svc: run the router service (started by `herd up` or a Deployment)."""
import argparse
import logging
import os

from llama4.dtypes import DTYPE_NAMES, torch_dtype
from llama4.quant import EXPERT_DTYPES
from plumbing.auth import CLUSTER_TOKEN_ENV
from plumbing.grpc_server import MAX_MESSAGE_BYTES
from plumbing.lifecycle import serve_until_signalled
from plumbing.metrics_http import serve_metrics
from router_svc.server import serve


def main() -> None:
    ap = argparse.ArgumentParser(prog="router_svc")
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    ap.add_argument("--expert-dtype", default="auto", choices=EXPERT_DTYPES, help="how the workers hold experts")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cluster", default="herd")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker-wait", type=float, default=30.0,
                    help="seconds a Route waits for a restarting worker (herd up derives it from the shard size)")
    ap.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES, help="gRPC message cap, each way")
    ap.add_argument("--no-coalesce", action="store_true",
                    help="send each Route exchange on its own, never together with others for the same layer")
    ap.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics here (0 = any free port)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    # The worker registry lives in the state Redis; the URL carries a password: environment, not argv.
    redis_url = os.environ.get("HERD_STATE_REDIS_URL") or os.environ["HERD_REDIS_URL"]
    server, port, servicer = serve(args.model, torch_dtype(args.dtype), redis_url, args.cluster, args.host, args.port,
                            max_message_bytes=args.max_message_bytes,
                            worker_timeout=args.worker_wait, token=os.environ.get(CLUSTER_TOKEN_ENV) or None,
                            expert_dtype=args.expert_dtype, coalesce=not args.no_coalesce)
    listening = f"ROUTER_LISTENING {args.host}:{port}"
    if args.metrics_port is not None:
        listening += f" METRICS {args.host}:{serve_metrics(servicer.metrics.registry, args.host, args.metrics_port)}"
    print(listening, flush=True)
    serve_until_signalled(server)


if __name__ == "__main__":
    main()
