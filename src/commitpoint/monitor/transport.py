"""How coordinators reach a monitor: in-process or as a Ray actor, behind one typed client.

:class:`MonitorClient` has one method per monitor call a coordinator makes. Each forwards to the
monitor's method of the same name: directly for an in-process monitor, through ``.remote`` +
``ray.get`` for an actor handle; the async forms are derived from the same call, once. A
commitpoint error raised in the actor reaches the caller as itself (same type, same fields), not
wrapped in Ray's ``RayTaskError``.
:func:`get_actor` is the Ray actor factory behind ``CheckpointMonitor.get_actor``: commitpoint's
own arguments or Trinity-RFT's (``default_local_dir``, ``default_hdfs_dir``), or a look-up of
the running actor by namespace alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from commitpoint.errors import CommitpointError, InvalidArgument, MonitorNotFound
from commitpoint.monitor.slots import SaveStrategy
from commitpoint.storage.protocol import FileRecord

if TYPE_CHECKING:
    from commitpoint.monitor.service import CheckpointMonitor

T = TypeVar("T")

ACTOR_DEFAULTS: dict[str, Any] = {
    "get_if_exists": True,
    "max_restarts": -1,
    "max_concurrency": 1024,
    "num_cpus": 0,
}
"""Ray options of the monitor actor unless the caller overrides them."""


@dataclass(frozen=True)
class ActorRequest:
    """What ``CheckpointMonitor.get_actor`` was asked for, in either vocabulary."""

    namespace: str | None
    name: str = "checkpoint_monitor"
    storage_url: str | None = None
    default_local_dir: str | None = None
    storage_options: Mapping[str, Any] | None = None
    save_strategy: object = None
    retention: Any | None = None
    replicate_to: str | None = None
    default_hdfs_dir: str | None = None
    replicate_options: Any | None = None
    resume_from_checkpoint: bool | None = None
    actor_options: Mapping[str, Any] = field(default_factory=dict)

    def root(self) -> str | None:
        return _one_of("storage_url", self.storage_url, "default_local_dir", self.default_local_dir)

    def replica(self) -> str | None:
        return _one_of("replicate_to", self.replicate_to, "default_hdfs_dir", self.default_hdfs_dir)


def _one_of(name: str, value: object, alias: str, alias_value: object) -> str | None:
    """``value`` or its Trinity-RFT alias (a path object becomes its string); both given and
    different is a mistake."""
    if value is not None and alias_value is not None and str(value) != str(alias_value):
        raise InvalidArgument(f"{name}={value!r} and {alias}={alias_value!r} name two roots")
    chosen = value if value is not None else alias_value
    return None if chosen is None else str(chosen)


def get_actor(cls: type[CheckpointMonitor], request: ActorRequest) -> Any:
    """The named monitor actor: a look-up without a root, else created on first call (then
    shared; a second root for the same name is refused), resuming from the checkpoint pointer
    when a trainer starts."""
    import ray

    url, replica = request.root(), request.replica()
    if url is None:
        extra = sorted(
            k
            for k, v in {
                "storage_options": request.storage_options,
                "save_strategy": request.save_strategy,
                "retention": request.retention,
                "replicate_to / default_hdfs_dir": replica,
                **request.actor_options,
            }.items()
            if v is not None
        )
        if extra:
            raise InvalidArgument(
                "get_actor without a root (storage_url / default_local_dir) looks up the running "
                f"monitor; these need a root: {extra}"
            )
        try:
            return ray.get_actor(request.name, namespace=request.namespace)
        except ValueError:
            raise MonitorNotFound(request.name, request.namespace) from None
    strategy = SaveStrategy.parse(
        SaveStrategy.UNRESTRICTED if request.save_strategy is None else request.save_strategy
    )
    handle = get_or_create_actor(
        cls,
        namespace=request.namespace,
        name=request.name,
        init_args=(
            url,
            dict(request.storage_options or {}),
            strategy,
            request.retention,
            replica,
            request.replicate_options,
        ),
        actor_options=request.actor_options,
    )
    with _unwrapped():
        running_url, _ = ray.get(handle.storage_config.remote())
    if running_url != url:
        raise InvalidArgument(
            f"monitor {request.name!r} of namespace {request.namespace!r} already runs on "
            f"{running_url!r}, not {url!r}"
        )
    resume = request.resume_from_checkpoint
    if resume is None:
        resume = request.default_local_dir is not None  # Trinity's trainer starting a run
    if resume:
        with _unwrapped():
            ray.get(handle.resume_from_checkpoint.remote())
    return handle


def get_or_create_actor(
    cls: type[CheckpointMonitor],
    *,
    namespace: str | None,
    name: str,
    init_args: Sequence[Any],
    actor_options: Mapping[str, Any],
) -> Any:
    """The named monitor actor in ``namespace``: created on first call, shared afterwards."""
    import ray

    options = {**ACTOR_DEFAULTS, "name": name, "namespace": namespace, **actor_options}
    return ray.remote(cls).options(**options).remote(*init_args)


class MonitorClient:
    """Calls a monitor synchronously or from an event loop, in-process or over Ray."""

    def __init__(self, monitor: Any) -> None:
        from commitpoint.monitor.service import CheckpointMonitor

        if isinstance(monitor, CheckpointMonitor):
            self._local: CheckpointMonitor | None = monitor
        elif hasattr(getattr(monitor, "notify_finished", None), "remote"):
            if not hasattr(monitor, "storage_config"):
                raise InvalidArgument(
                    "checkpoint_monitor is a Ray actor with notify_* methods but not a commitpoint "
                    "monitor (upstream Trinity-RFT's CheckpointMonitor?); create it with "
                    "commitpoint.CheckpointMonitor.get_actor(namespace, default_local_dir=...)"
                )
            self._local = None
        else:
            raise InvalidArgument(
                "checkpoint_monitor must be a CheckpointMonitor or the Ray actor handle from "
                f"CheckpointMonitor.get_actor(), got {type(monitor).__name__}"
            )
        self._monitor = monitor

    @property
    def is_remote(self) -> bool:
        return self._local is None

    # -- the calls ----------------------------------------------------------------------------
    def storage_config(self) -> tuple[str, dict[str, Any]]:
        result: tuple[str, dict[str, Any]] = self._call("storage_config")
        return result

    def latest_steps(self) -> dict[str, int | None]:
        result: dict[str, int | None] = self._call("latest_steps")
        return result

    def notify_started(
        self,
        node_id: str,
        job_id: str,
        *,
        step: int | None = None,
        is_state_dict: bool = False,
        name: str = "",
        must_run: bool = False,
    ) -> dict[str, Any]:
        """Take a save slot; with ``step``, also admit the save (the reply's ``action``)."""
        if step is None:
            slot_only: dict[str, Any] = self._call("notify_started", node_id, job_id)
            return slot_only
        result: dict[str, Any] = self._call(
            "notify_started",
            node_id,
            job_id,
            step=step,
            is_state_dict=is_state_dict,
            name=name,
            must_run=must_run,
        )
        return result

    def notify_finished(
        self,
        step: int,
        is_state_dict: bool,
        *,
        name: str,
        files: list[FileRecord],
        writer_epoch: int | None,
    ) -> None:
        self._call(
            "notify_finished",
            step,
            is_state_dict,
            name=name,
            files=files,
            writer_epoch=writer_epoch,
        )

    def notify_failed(
        self, step: int, is_state_dict: bool, *, name: str, error: str, started: bool
    ) -> None:
        self._call("notify_failed", step, is_state_dict, name=name, error=error, started=started)

    def register(
        self, step: int, is_state_dict: bool, counts: dict[str, int], participants: int
    ) -> int:
        """Register ``counts`` for ``step`` and ask for it to be monitored; the monitor epoch."""
        self._call("register_thread_count", step, **counts)
        epoch: int = self._call("monitor_step", step, is_state_dict, participants)
        return epoch

    async def aregister(
        self, step: int, is_state_dict: bool, counts: dict[str, int], participants: int
    ) -> int:
        """:meth:`register` from an event loop."""
        if self._local is not None:
            return await asyncio.to_thread(self.register, step, is_state_dict, counts, participants)
        await self._acall("register_thread_count", step, **counts)
        epoch: int = await self._acall("monitor_step", step, is_state_dict, participants)
        return epoch

    # -- one forwarding path ------------------------------------------------------------------
    def _target(self, method: str) -> Any:
        return getattr(self._local if self._local is not None else self._monitor, method)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        target = self._target(method)
        if self._local is not None:
            return target(*args, **kwargs)
        import ray

        with _unwrapped():
            return ray.get(target.remote(*args, **kwargs))

    async def _acall(self, method: str, *args: Any, **kwargs: Any) -> Any:
        target = self._target(method)
        if self._local is not None:
            return await asyncio.to_thread(target, *args, **kwargs)
        with _unwrapped():
            return await target.remote(*args, **kwargs)


@contextlib.contextmanager
def _unwrapped() -> Iterator[None]:
    """Re-raise the commitpoint error a Ray task raised as itself (Ray's error is chained)."""
    from ray.exceptions import RayTaskError

    try:
        yield
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, CommitpointError):
            raise cause from exc
        raise
