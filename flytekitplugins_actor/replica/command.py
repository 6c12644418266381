"""The one model of a task's `pyflyte-execute` command: parsed from container args, rebuilt as args, re-pathed.

Every place that reads, builds or rewrites an execution's command uses `ExecutionCommand`: the replica (what to
run), local runs and benches (`build`), the connector (validation) and maps (`with_paths(..., item=i)`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

FAST_EXECUTE = "pyflyte-fast-execute"
EXECUTE = "pyflyte-execute"
EMPTY_PATH = '""'
"""How an unset checkpoint path is rendered into container args (flytekit's entrypoint treats it as None)."""

# option -> field, in the order flytekit renders them (the dynamic ones are what pyflyte-fast-execute inserts)
_EXECUTE_OPTIONS = {
    "--inputs": "inputs",
    "--output-prefix": "output_prefix",
    "--raw-output-data-prefix": "raw_output_data_prefix",
    "--checkpoint-path": "checkpoint_path",
    "--prev-checkpoint": "prev_checkpoint",
    "--dynamic-addl-distro": "distribution",
    "--dynamic-dest-dir": "dest_dir",
    "--resolver": "resolver",
}
_FAST_OPTIONS = {"--additional-distribution": "distribution", "--dest-dir": "dest_dir"}


def _parse_options(args: Sequence[str], options: Dict[str, str], command: str) -> Tuple[Dict[str, str], List[str]]:
    """`--opt value` / `--opt=value` pairs up to `--` (or the first positional); returns (options, the rest)."""
    found: Dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return found, list(args[i + 1 :])
        if not arg.startswith("--"):
            return found, list(args[i:])
        name, eq, value = arg.partition("=")
        if name == "--test":
            raise ValueError(f"{command} --test (dry run) is not supported on a replica")
        if name not in options:
            raise ValueError(f"{command} got unknown option {name!r}; expected one of {sorted(options)}")
        if not eq:
            i += 1
            if i >= len(args):
                raise ValueError(f"{command} option {name} needs a value")
            value = args[i]
        found[options[name]] = value
        i += 1
    return found, []


def _per_item(path: Optional[str], item: int) -> Optional[str]:
    """A checkpoint path made item i's own (`<path>/<i>`); an unset one stays unset."""
    if not path or path == EMPTY_PATH:
        return path
    return f"{path.rstrip('/')}/{item}"


@dataclass(frozen=True)
class ExecutionCommand:
    """`[pyflyte-fast-execute --additional-distribution D --dest-dir P --] pyflyte-execute --inputs ... -- <resolver
    args>`: the options flytekit's two entrypoints take, and nothing else (an unknown option is refused)."""

    inputs: str
    output_prefix: str
    resolver: str
    resolver_args: Tuple[str, ...] = ()
    raw_output_data_prefix: Optional[str] = None
    checkpoint_path: Optional[str] = None
    prev_checkpoint: Optional[str] = None
    distribution: Optional[str] = None
    """The fast-registered code archive the task's module comes from (None: the code is in the image)."""
    dest_dir: Optional[str] = None
    fast: bool = False
    """Rendered behind `pyflyte-fast-execute` (else the distribution, if any, rides on pyflyte-execute's own
    --dynamic-addl-distro option)."""

    def __post_init__(self) -> None:
        for name in ("inputs", "output_prefix", "resolver"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{EXECUTE} needs --{name.replace('_', '-')}, got {value!r}")
        if not isinstance(self.resolver_args, tuple):
            object.__setattr__(self, "resolver_args", tuple(str(a) for a in self.resolver_args))

    @classmethod
    def parse(cls, args: Sequence[str]) -> "ExecutionCommand":
        """Parses rendered container args; raises ValueError naming what is wrong."""
        args = [str(a) for a in args]
        fast: Dict[str, str] = {}
        is_fast = bool(args) and args[0] == FAST_EXECUTE
        if is_fast:
            fast, args = _parse_options(args[1:], _FAST_OPTIONS, FAST_EXECUTE)
        if not args or args[0] != EXECUTE:
            raise ValueError(f"an actor execution must run {EXECUTE!r}, got command {args[:1]!r}")
        opts, resolver_args = _parse_options(args[1:], _EXECUTE_OPTIONS, EXECUTE)
        for required in ("inputs", "output_prefix", "resolver"):
            if not opts.get(required):
                raise ValueError(f"{EXECUTE} args carry no --{required.replace('_', '-')}")
        return cls(
            inputs=opts["inputs"],
            output_prefix=opts["output_prefix"],
            resolver=opts["resolver"],
            resolver_args=tuple(a for a in resolver_args if a != "--"),
            raw_output_data_prefix=opts.get("raw_output_data_prefix"),
            checkpoint_path=opts.get("checkpoint_path"),
            prev_checkpoint=opts.get("prev_checkpoint"),
            distribution=fast.get("distribution") or opts.get("distribution"),
            dest_dir=fast.get("dest_dir") or opts.get("dest_dir"),
            fast=is_fast,
        )

    @classmethod
    def build(
        cls,
        inputs: str,
        output_prefix: str,
        resolver: str,
        resolver_args: Sequence[str] = (),
        raw_output_data_prefix: Optional[str] = None,
        checkpoint_path: Optional[str] = None,
        prev_checkpoint: Optional[str] = None,
        distribution: Optional[str] = None,
        dest_dir: Optional[str] = None,
    ) -> "ExecutionCommand":
        """A command for a local run or a bench, as flytekit would render it for a pod."""
        return cls(
            inputs=inputs,
            output_prefix=output_prefix,
            resolver=resolver,
            resolver_args=tuple(str(a) for a in resolver_args),
            raw_output_data_prefix=raw_output_data_prefix,
            checkpoint_path=checkpoint_path,
            prev_checkpoint=prev_checkpoint,
            distribution=distribution,
            dest_dir=dest_dir,
            fast=distribution is not None,
        )

    def to_args(self) -> List[str]:
        """The container args, in the order flytekit renders them; `parse(c.to_args()) == c`."""
        args: List[str] = []
        if self.fast:
            args.append(FAST_EXECUTE)
            if self.distribution is not None:
                args += ["--additional-distribution", self.distribution]
            if self.dest_dir is not None:
                args += ["--dest-dir", self.dest_dir]
            args.append("--")
        args.append(EXECUTE)
        for option, name in _EXECUTE_OPTIONS.items():
            if self.fast and name in ("distribution", "dest_dir"):
                continue  # pyflyte-fast-execute passes them on itself
            value = getattr(self, name)
            if value is not None:
                args += [option, value]
        return [*args, "--", *self.resolver_args]

    def with_paths(
        self, inputs: Optional[str] = None, output_prefix: Optional[str] = None, item: Optional[int] = None
    ) -> "ExecutionCommand":
        """The same command reading `inputs` and writing under `output_prefix`; with `item`, the checkpoint
        paths become that map item's own (`<path>/<item>`). The resolver args are never touched."""
        changes: Dict[str, Optional[str]] = {}
        if inputs is not None:
            changes["inputs"] = inputs
        if output_prefix is not None:
            changes["output_prefix"] = output_prefix
        if item is not None:
            if not isinstance(item, int) or isinstance(item, bool) or item < 0:
                raise ValueError(f"item must be a map item index (an int >= 0), got {item!r}")
            changes["checkpoint_path"] = _per_item(self.checkpoint_path, item)
            changes["prev_checkpoint"] = _per_item(self.prev_checkpoint, item)
        return replace(self, **changes)
