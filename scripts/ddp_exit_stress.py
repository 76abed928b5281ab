"""Start a tiny two-rank DDP job on CPU (gloo) many times and count the runs that end badly.

Each run joins the process group the way train.py does (``common.distributed.joined``), takes
one DDP step with a backward pass and leaves. ``--plain_exit`` leaves with a bare
``destroy_process_group()`` instead, as our code did before the final barrier was kept: some of
those runs abort after their work is done (SIGABRT, "terminate called without an active
exception"). Prints the count of each; exits 1 if any run of the chosen kind failed.

    python scripts/ddp_exit_stress.py --runs 40
    python scripts/ddp_exit_stress.py --runs 40 --plain_exit
"""
import argparse
import os
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(rank, port, plain_exit):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    sys.path.insert(0, ROOT)
    import torch

    from common import distributed

    torch.set_num_threads(1)

    def step(device):
        net = torch.nn.Linear(3, 2)
        ddp = distributed.wrap_model(net, device)
        ddp(torch.ones(4, 3)).sum().backward()
        return distributed.mean_all(torch.tensor([float(rank)])).item()

    if plain_exit:
        import torch.distributed as dist

        device = distributed.init("cpu")
        step(device)
        dist.barrier()
        dist.destroy_process_group()
    else:
        with distributed.joined("cpu") as device:
            step(device)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=40, help="how many two-rank runs to start (default 40)")
    ap.add_argument("--plain_exit", action="store_true",
                    help="leave with a bare destroy_process_group(), without the kept final barrier")
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp

    failed = 0
    for i in range(args.runs):
        try:
            mp.spawn(_worker, args=(free_port(), args.plain_exit), nprocs=2, join=True)
        except mp.ProcessExitedException as e:
            failed += 1
            print(f"run {i + 1}: {e}", flush=True)
    kind = "bare destroy_process_group" if args.plain_exit else "distributed.joined"
    print(f"{kind}: {failed} of {args.runs} two-rank runs failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
