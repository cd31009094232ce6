"""
The `nanochat` command. This module only declares the commands and their options; each command imports
what it needs when it runs (torch, sky and rich.live are heavy), so `nanochat --help` answers at once.
The work lives in the packages beside this one (see nanochat_cli/__init__.py): commands/ (what each command
does), planning/ (dollars -> run, the meter), backends/ (where the job runs), and state, stream, pull.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup


class _Group(TyperGroup):
    """Typer 0.29 coerces every processed option through pydantic, and the root group's --help flag is
    processed (as None, "not given") on every subcommand call - importing pydantic (0.2-0.4 s) just to
    print `nanochat up --help`. "Not given" is False for a flag, so say so and skip the coercion."""

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None and not getattr(opt, "_nanochat_fast", False):
            original = opt.process_value
            opt.process_value = lambda ctx, value: original(ctx, False if value is None else value)
            opt._nanochat_fast = True
        return opt


app = typer.Typer(
    cls=_Group,
    name="nanochat",
    help="Train an LLM from scratch within a budget, on any cloud or on this machine, then chat with it.\n\n"
         "Start here: `nanochat train --local` (free, a few minutes on a laptop CPU), then `nanochat chat`.\n"
         "On a cloud: `nanochat up --dryrun` to compare offers, `nanochat train --budget 100`, "
         "`nanochat pull`, `nanochat down`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def friendly(fn):
    """Turn user errors into one line on stderr and exit code 2 (never a traceback); Ctrl-C outside a log
    stream (which handles it as "detach") says what may still be running."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from nanochat_core.common import NanochatError
        try:
            return fn(*args, **kwargs)
        except NanochatError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise typer.Exit(2)
        except OSError as e:  # the environment said no (permissions, disk full, missing tool): one line too
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            print(f"error: {e.strerror or e}{where}", file=sys.stderr, flush=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            print("\ninterrupted: anything already launched keeps running - `nanochat status` shows it, "
                  "`nanochat down` stops it", file=sys.stderr, flush=True)
            raise typer.Exit(130)
    return wrapper


# Options shared by several commands -------------------------------------------------------------

GPUS = typer.Option("H100:8", "--gpus", metavar="TYPE:COUNT", help="GPU type and count per node, e.g. H100:8, A100-80GB:8, L4:1.")
SPOT = typer.Option(False, "--spot", help="Use spot instances (cheaper, preemptible): a managed job that "
                                          "recovers and resumes from the latest checkpoint.")
CLOUDS = typer.Option(None, "--clouds", metavar="LIST", help="Only consider these clouds, comma-separated (e.g. aws,gcp,lambda).")
NODES = typer.Option(1, "--nodes", min=1, max=64, help="Number of nodes (multi-node training via torchrun).")
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
YES = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")
CLUSTER = typer.Option(None, "--cluster", metavar="NAME", help="Cluster name (default: the most recently launched one).")
RUN = typer.Option(None, "--name", metavar="NAME", help="Run name: results go to $NANOCHAT_HOME/runs/<name>/.")
DTYPE = typer.Option("auto", "--dtype", help="Weights in memory: auto (int4 on a CPU, bf16 on a GPU), fp32, bf16, "
                     "int8 or int4 (see docs/PERFORMANCE.md).")


@app.command()
@friendly
def up(
    gpus: str = GPUS,
    spot: bool = SPOT,
    clouds: Optional[str] = CLOUDS,
    nodes: int = NODES,
    dryrun: bool = typer.Option(False, "--dryrun", help="Only rank the offers; provision nothing."),
    json_out: bool = JSON,
    yes: bool = YES,
    allow_pcie: bool = typer.Option(False, "--allow-pcie", help="Include multi-GPU offers without NVLink "
                                                                "(PCIe only: much slower 8-GPU training)."),
    max_price: Optional[float] = typer.Option(None, "--max-price", metavar="USD", help="Ignore offers above this $/h per node."),
    name: str = typer.Option("nanochat", "--cluster", help="Name of the cluster to create."),
    autostop: int = typer.Option(10, "--autostop", min=1, help="Tear the cluster down after this many idle "
                                                                "minutes (enforced on the cluster itself)."),
    local: bool = typer.Option(False, "--local", help="Use this machine as the 'cluster' (no cloud, $0)."),
) -> None:
    """Rank GPU offers across clouds (price/h, region, spot, interconnect) and provision the cheapest."""
    from nanochat_cli.commands import run as flows
    flows.cmd_up(gpus=gpus, spot=spot, clouds=clouds, nodes=nodes, dryrun=dryrun, json_out=json_out, yes=yes,
                 allow_pcie=allow_pcie, max_price=max_price, name=name, autostop=autostop, local=local)


@app.command()
@friendly
def train(
    budget: str = typer.Option("100", "--budget", metavar="USD", help="Hard cap in US dollars for the whole run."),
    depth: Optional[int] = typer.Option(None, "--depth", metavar="N", help="Model depth (overrides the planner's choice)."),
    local: bool = typer.Option(False, "--local", help="Train on this machine (CPU is fine): a tiny model on "
                                                      "the bundled corpus in a few minutes, $0."),
    spot: bool = SPOT,
    detach: bool = typer.Option(False, "--detach", help="Start the run and return at once (`nanochat logs` "
                                                        "attaches later)."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Show the plan and stop."),
    json_out: bool = JSON,
    yes: bool = YES,
    name: Optional[str] = RUN,
    gpus: str = GPUS,
    clouds: Optional[str] = CLOUDS,
    nodes: int = NODES,
    cluster: Optional[str] = CLUSTER,
    keep: bool = typer.Option(False, "--keep", help="Stop (not delete) the cluster when the run ends."),
    steps: Optional[int] = typer.Option(None, "--steps", metavar="N", help="Fixed number of training steps "
                                        "(smoke runs): base training's, and with --local also SFT's."),
    minutes: Optional[float] = typer.Option(None, "--minutes", metavar="M", help="Time-bound base training to this many "
                                            "minutes (the --local default is a fixed number of steps: the same model "
                                            "however busy the machine)."),
    data: Optional[str] = typer.Option(None, "--data", metavar="SOURCE", help="Pre-training data: bundled, climbmix, "
                                       "fineweb-edu or a URL list; a folder of your documents (.txt .md .jsonl .parquet); "
                                       "or both, e.g. bundled,./my_docs:0.2 (your documents are 20%)."),
    stages: Optional[str] = typer.Option(None, "--stages", metavar="LIST", help="Only these pipeline stages, "
                                         "comma-separated, from preflight,tok,base,mid,sft,rl,eval,report (RL is off by "
                                         "default); finished stages are skipped anyway."),
    bucket: Optional[str] = typer.Option(None, "--bucket", metavar="URL", help="Bucket for checkpoints (s3://..., gs://...) "
                                                                "so they outlive the node; needed to resume spot runs."),
    wandb: bool = typer.Option(False, "--wandb", help="Log every stage's progress to Weights & Biases (on by "
                                                      "itself when WANDB_API_KEY is set; WANDB_MODE=offline works)."),
    chat_data: Optional[Path] = typer.Option(None, "--chat-data", metavar="FILE", help="Your conversations, one "
                                             '{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]} per '
                                             "line, mixed into SFT (and mid) with the shipped mix."),
    chat_share: Optional[float] = typer.Option(None, "--chat-share", metavar="F", help="Share of SFT conversations "
                                               "that are yours (default 0.2 cloud, 0.15 local; 1 = only yours)."),
    identity: Optional[str] = typer.Option(None, "--identity", metavar="TEXT|FILE", help='Who the assistant is, e.g. '
                                           '"You are Ada, the support assistant of ...": taught in SFT and used as '
                                           "the default system prompt of `nanochat chat` / `serve`."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out bad documents/conversations (each is listed "
                                                            "with file and line, and counted) instead of refusing."),
    preflight_only: bool = typer.Option(False, "--preflight-only", help="Run only the preflight checks (every "
                                        "device path at the planned depth, about a minute) and stop."),
) -> None:
    """Plan the run from the budget, launch the whole pipeline and stream it with a live cost meter."""
    from nanochat_cli.commands import run as flows
    if wandb:
        import os
        from nanochat_core.common import NanochatError
        if not local and not os.environ.get("WANDB_API_KEY"):
            raise NanochatError("--wandb on a cloud run needs WANDB_API_KEY set here (it reaches the node as a secret)")
        os.environ["NANOCHAT_WANDB"] = "1"   # the local job inherits our environment
    flows.cmd_train(flows.TrainFlags(
        budget=budget, depth=depth, local=local, spot=spot, detach=detach, dryrun=dryrun, json_out=json_out, yes=yes,
        name=name, gpus=gpus, clouds=clouds, nodes=nodes, cluster=cluster, keep=keep, steps=steps, minutes=minutes,
        data=data, bucket=bucket, stages="preflight" if preflight_only else stages, chat_data=chat_data,
        identity=identity, chat_share=chat_share, skip_bad=skip_bad))


@app.command()
@friendly
def logs(
    name: Optional[str] = RUN,
    from_start: bool = typer.Option(False, "--from-start", help="Replay the whole log instead of continuing "
                                                                "where the last viewer stopped."),
    follow: bool = typer.Option(True, "--follow/--no-follow", help="Keep streaming until the run ends."),
) -> None:
    """Re-attach to a run's log stream and cost meter (Ctrl-C detaches; the run keeps going)."""
    from nanochat_cli.commands import run as flows
    flows.cmd_logs(name=name, from_start=from_start, follow=follow)


@app.command()
@friendly
def status(json_out: bool = JSON) -> None:
    """List clusters and runs: state, uptime, $/h, $ spent so far, budget left."""
    from nanochat_cli.commands import manage as admin
    admin.cmd_status(json_out=json_out)


@app.command()
@friendly
def pull(
    name: Optional[str] = RUN,
    dest: Optional[Path] = typer.Option(None, "--dest", help="Where to put the run (default: "
                                                             "$NANOCHAT_HOME/runs/<name>)."),
) -> None:
    """Bring checkpoints, tokenizer and report home (resumable), verified against the run's manifest."""
    from nanochat_cli.commands import manage as admin
    admin.cmd_pull(name=name, dest=dest)


@app.command("eval")
@friendly
def eval_(
    local: bool = typer.Option(False, "--local", help="Evaluate on this machine (a pulled or local run)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Run directory or checkpoint "
                                                                        "directory (default: latest run)."),
    name: Optional[str] = RUN,
    json_out: bool = JSON,
    yes: bool = YES,
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="auto|fp32|bf16|int8|int4", help="Weights to "
                                        "evaluate with (see docs/PERFORMANCE.md); auto = int4 on a CPU, bf16 on "
                                        "a GPU, as chat. Default: the weights training's own evaluations used "
                                        "(fp32 on a CPU, bf16 on a GPU), so report.md stays comparable; another "
                                        "choice is named next to its metrics."),
) -> None:
    """Run the evaluation suite, update report.md and print the metrics table."""
    from nanochat_cli.commands import manage as admin
    admin.cmd_eval(local=local, checkpoint=checkpoint, name=name, json_out=json_out, yes=yes, dtype=dtype)


@app.command()
@friendly
def chat(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Run or checkpoint directory "
                                                                        "(default: the latest run)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer one prompt and exit."),
    temperature: float = typer.Option(0.6, "--temperature", min=0.0, max=2.0, help="Sampling temperature."),
    top_k: int = typer.Option(50, "--top-k", min=0, max=200, help="Sample from the k most likely tokens "
                                                                  "(0 = all)."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, max=4096, help="Longest reply in tokens."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or mps (default: best available)."),
    dtype: str = DTYPE,
    system: Optional[str] = typer.Option(None, "--system", metavar="TEXT", help="System prompt (default: the "
                                         "identity the model was trained with, if any; \"\" for none)."),
) -> None:
    """Chat in the terminal with your model."""
    from nanochat_cli.commands import run as flows
    ckpt = flows.resolve_checkpoint(checkpoint)
    from nanochat_core.inference.chat import run_chat
    run_chat(checkpoint=str(ckpt), prompt=prompt, temperature=temperature, top_k=top_k,
             max_tokens=max_tokens, device=device, dtype=dtype, system=system)


@app.command()
@friendly
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 exposes it)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Run or checkpoint directory "
                                                                        "(default: the latest run)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or mps (default: best available)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="NANOCHAT_API_KEY", show_envvar=True,
                                          help="Require `Authorization: Bearer KEY` on /v1/* (needed to listen on "
                                               "anything but 127.0.0.1; prefer the variable to the flag)."),
    dtype: str = DTYPE,
) -> None:
    """Web chat UI and an OpenAI-compatible /v1/chat/completions endpoint (streaming)."""
    from nanochat_core.inference.serve import check_bind, run_server
    check_bind(host, api_key)   # before looking for a checkpoint: refusing is the first thing to say
    from nanochat_cli.commands import run as flows
    ckpt = flows.resolve_checkpoint(checkpoint)
    run_server(host=host, port=port, checkpoint=str(ckpt), device=device, api_key=api_key, dtype=dtype)


@app.command()
@friendly
def export(
    out: Path = typer.Option(..., "--out", help="Folder to write (new, empty, or an earlier export)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Run or checkpoint directory "
                                                                        "(default: the latest run)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Weights in the export: fp32 or bf16 (half the size)."),
) -> None:
    """Write the model as a Hugging Face folder (transformers loads it with trust_remote_code=True)."""
    from nanochat_cli.commands import run as flows
    ckpt = flows.resolve_checkpoint(checkpoint)
    from nanochat_core.inference.export import export as export_model, summary
    folder = export_model(ckpt, out, dtype=dtype)
    print("\n".join(summary(folder)))
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)")


@app.command()
@friendly
def down(
    yes: bool = YES,
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Only this cluster (default: all of ours)."),
) -> None:
    """Tear down clusters and stop running jobs; prints the final cost. Safe to run twice."""
    from nanochat_cli.commands import manage as admin
    admin.cmd_down(yes=yes, cluster=cluster)


if __name__ == "__main__":
    app()
