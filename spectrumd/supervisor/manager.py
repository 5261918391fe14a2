"""The set of instances: configuration, reload, run-time instances, the data file.

Run-time instances (CreateInstance) are kept in ``STATE_DIR/instances.json``::

    {"version": 1, "instances": {"NAME": {"application": "APP", "resources": [...]}}}

The same shape as the configuration's ``instances`` section, so the Nix side
can import it; the daemon reads the configuration and this file together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from spectrumd.errors import (
    ConfigError,
    Exists,
    Failed,
    InvalidArgument,
    InvalidState,
    NoSuchApplication,
    NoSuchInstance,
    NoSuchResource,
    SpectrumError,
)
from spectrumd.lifecycle import is_failure
from spectrumd.model.config import (
    Config,
    instance_to_json,
    load_config,
    parse_instance,
    resolve_auto_vmm,
    validate_name,
)
from spectrumd.model.types import InstanceDef, Resource, Restart
from spectrumd.supervisor import process
from spectrumd.supervisor.env import Environment
from spectrumd.supervisor.instance import Instance
from spectrumd.supervisor.statefile import write_atomically
from spectrumd.supervisor.vmrun import PID_FILES, BadRecord, RunRecord, read_record
from spectrumd.vmm import crosvm_available

log = logging.getLogger(__name__)

DATA_FILE = "instances.json"
CREATE_OPTIONS = frozenset({"vmm", "accel", "stop_timeout", "restart"})
# Restart policy "on-failure": wait 1, 2, 4, ... s (at most MAX) between tries,
# and give up after BURST restarts within INTERVAL s (like StartLimitBurst).
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
RESTART_BURST = 5
RESTART_INTERVAL = 60.0

InstanceListener = Callable[[Instance], None]


class Supervisor:
    """Owns every Instance; the bus layer observes it through listeners."""

    def __init__(self, config_path: Path, env: Environment) -> None:
        self.config_path = config_path
        self.env = env
        self.data_path = env.state_dir / DATA_FILE
        # An absent defaults.vmm is resolved once, here; an explicit crosvm is
        # checked against PATH at every load.
        self.auto_vmm = resolve_auto_vmm(crosvm_available())
        log.info("automatic VMM choice: %s", self.auto_vmm.value)
        self.config = self._load_at_start()
        self.instances: dict[str, Instance] = {}
        self.on_added: list[InstanceListener] = []
        self.on_removed: list[InstanceListener] = []
        self.on_changed: list[Callable[[Instance, frozenset[str]], None]] = []
        self._restarts: dict[str, list[float]] = {}
        self._restart_tasks: dict[str, asyncio.Task[None]] = {}
        for inst_def in self.config.instances.values():
            self._add(inst_def, notify=False)

    # -- lookups -----------------------------------------------------------

    def get(self, name: str) -> Instance:
        try:
            return self.instances[name]
        except KeyError:
            raise NoSuchInstance(f'no instance "{name}"') from None

    # -- membership ----------------------------------------------------------

    def _add(self, inst_def: InstanceDef, notify: bool = True) -> Instance:
        inst = Instance(
            inst_def,
            self.config.applications[inst_def.application],
            self._resources_of(inst_def, self.config),
            self.env,
        )
        inst.listeners.append(self._instance_changed)
        self.instances[inst.name] = inst
        if notify:
            for cb in self.on_added:
                cb(inst)
        return inst

    @staticmethod
    def _resources_of(inst_def: InstanceDef, config: Config) -> tuple[Resource, ...]:
        return tuple(config.resources[r] for r in inst_def.resources)

    def _remove(self, inst: Instance) -> None:
        del self.instances[inst.name]
        inst.listeners.clear()
        for cb in self.on_removed:
            cb(inst)

    def _instance_changed(self, inst: Instance, changed: frozenset[str]) -> None:
        for cb in self.on_changed:
            cb(inst, changed)
        if "state" in changed and is_failure(inst.state):
            self._maybe_restart(inst)
        if inst.removed and not inst.active and self.instances.get(inst.name) is inst:
            log.info(
                "removing %s, dropped from the configuration and now %s", inst.name, inst.state
            )
            self._remove(inst)

    # -- restart policy -------------------------------------------------------------

    def _maybe_restart(self, inst: Instance) -> None:
        if inst.definition.restart != Restart.on_failure or inst.removed:
            return
        if inst.name in self._restart_tasks:
            return
        now = time.monotonic()
        recent = [t for t in self._restarts.get(inst.name, []) if now - t < RESTART_INTERVAL]
        if len(recent) >= RESTART_BURST:
            reason = (
                f"{inst.state_reason}; not restarted again: {RESTART_BURST} restarts "
                f"within {RESTART_INTERVAL:g} s"
            )
            inst.give_reason(reason)
            log.error("%s: %s", inst.name, reason)
            return
        delay = min(RESTART_DELAY * 2 ** len(recent), MAX_RESTART_DELAY)
        self._restarts[inst.name] = [*recent, now]
        last = inst.state_reason
        log.info("%s failed (%s); restarting in %g s", inst.name, last, delay)
        task = asyncio.ensure_future(self._restart(inst, delay, last))
        self._restart_tasks[inst.name] = task
        task.add_done_callback(lambda _: self._restart_tasks.pop(inst.name, None))

    async def _restart(self, inst: Instance, delay: float, last: str) -> None:
        await asyncio.sleep(delay)
        if not is_failure(inst.state) or self.instances.get(inst.name) is not inst:
            return  # someone started or removed it meanwhile
        try:
            await inst.start(reason=f"restarted after: {last}")
        except SpectrumError as e:
            log.error("%s: restart failed: %s", inst.name, e)

    # -- reload ------------------------------------------------------------

    def reload(self) -> tuple[list[str], list[str], list[str]]:
        """Re-read the configuration and apply the difference.

        Returns (added, removed, changed) names. Raises ConfigError (an
        InvalidArgument) and keeps the running configuration if the file is bad.
        """
        new = self._load()
        return self._apply(new)

    def _load_at_start(self) -> Config:
        """The configuration and the data file; a bad data file is set aside, not fatal.

        Raises ConfigError if the configuration itself is bad.
        """
        try:
            return self._load()
        except ConfigError as e:
            # Is it the data file's fault? Then the configuration alone loads.
            config = load_config(
                self.config_path, auto_vmm=self.auto_vmm, crosvm_available=crosvm_available()
            )
            aside = self.data_path.with_name(f"{DATA_FILE}.bad-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(self.data_path, aside)
            log.error(
                "cannot use the run-time instances in %s (%s); starting without them, "
                "the file is kept as %s",
                self.data_path,
                e,
                aside,
            )
            return config

    def _load(self) -> Config:
        return load_config(
            self.config_path,
            self.data_path,
            auto_vmm=self.auto_vmm,
            crosvm_available=crosvm_available(),
        )

    def _apply(self, new: Config) -> tuple[list[str], list[str], list[str]]:
        self.config = new
        added, removed, changed = [], [], []
        for name, inst in list(self.instances.items()):
            inst_def = new.instances.get(name)
            if inst_def is None:
                removed.append(name)
                if inst.active:
                    inst.removed = True
                    log.info("%s was removed from the configuration; it goes once stopped", name)
                else:
                    self._remove(inst)
                continue
            inst.removed = False
            app = new.applications[inst_def.application]
            res = self._resources_of(inst_def, new)
            if (inst.definition, inst.application, inst.resources) != (inst_def, app, res):
                changed.append(name)
            inst.update_definition(inst_def, app, res)
        for name, inst_def in new.instances.items():
            if name not in self.instances:
                added.append(name)
                self._add(inst_def)
        log.info(
            "reloaded: %d added, %d removed, %d changed", len(added), len(removed), len(changed)
        )
        return added, removed, changed

    # -- run-time instances --------------------------------------------------

    def _save_data_file(self, instances: Mapping[str, InstanceDef]) -> None:
        body = {
            "version": 1,
            "instances": {
                name: instance_to_json(d, self.config.defaults)
                for name, d in sorted(instances.items())
                if d.origin == "runtime"
            },
        }
        try:
            self.env.state_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.data_path, json.dumps(body, indent=2) + "\n")
        except OSError as e:
            raise Failed(f"cannot write {self.data_path}: {e.strerror or e}") from None

    def create_instance(
        self,
        untrusted_name: str,
        untrusted_application: str,
        untrusted_resources: list[str],
        untrusted_options: Mapping[str, object],
    ) -> Instance:
        """Define a new instance at run time and keep it in the data file.

        Raises InvalidArgument, Exists, NoSuchApplication, NoSuchResource, Failed.
        """
        name = validate_name("name", untrusted_name)
        if name in self.instances:
            raise Exists(f'instance "{name}" already exists')
        if untrusted_application not in self.config.applications:
            raise NoSuchApplication(f'no application "{untrusted_application}"')
        for r in untrusted_resources:
            if r not in self.config.resources:
                raise NoSuchResource(f'no resource "{r}"')
        unknown = sorted(set(untrusted_options) - CREATE_OPTIONS)
        if unknown:
            raise InvalidArgument(
                f'unknown option "{unknown[0]}" (known: {", ".join(sorted(CREATE_OPTIONS))})'
            )
        body: dict[str, object] = {
            "application": untrusted_application,
            "resources": list(untrusted_resources),
            **untrusted_options,
        }
        inst_def = parse_instance(
            name,
            body,
            self.config.defaults,
            self.config.applications,
            self.config.resources,
            path="options",
            origin="runtime",
            crosvm_available=crosvm_available(),
        )
        self._save_data_file(
            {**{n: i.definition for n, i in self.instances.items()}, name: inst_def}
        )
        self.config = attrs.evolve(self.config, instances={**self.config.instances, name: inst_def})
        return self._add(inst_def)

    def delete_instance(self, name: str) -> None:
        """Forget a run-time instance. Raises NoSuchInstance, InvalidArgument, InvalidState."""
        inst = self.get(name)
        if inst.definition.origin != "runtime":
            raise InvalidArgument(
                f'instance "{name}" is defined in the configuration file; remove it there'
            )
        if inst.active:
            raise InvalidState(f"cannot delete {name}: it is {inst.state.value}")
        rest = {n: i.definition for n, i in self.instances.items() if n != name}
        self._save_data_file(rest)
        self.config = attrs.evolve(
            self.config, instances={n: d for n, d in self.config.instances.items() if n != name}
        )
        self._remove(inst)

    # -- shutdown ------------------------------------------------------------

    async def stop_all(self) -> None:
        """Stop every instance that has a VMM (also one starting or stopping), in parallel."""

        async def stop_one(inst: Instance) -> None:
            with contextlib.suppress(InvalidState):
                await inst.stop()

        await asyncio.gather(
            *(stop_one(i) for i in self.instances.values() if i.active), return_exceptions=True
        )

    # -- daemon restarts ----------------------------------------------------------

    def read_records(self) -> dict[str, RunRecord]:
        """The runs an earlier daemon left recorded, by instance, whose VMM still runs.

        A record that cannot be read is logged and its run directory left for
        a person to look at; a record of a VMM that has exited is returned too
        (adopting it marks the instance failed and cleans up).
        """
        records: dict[str, RunRecord] = {}
        run_root = self.env.state_dir / "run"
        if not run_root.is_dir():
            return records
        for run_dir in sorted(run_root.iterdir()):
            try:
                rec = read_record(run_dir)
            except BadRecord as e:
                log.error("cannot read a run record, not re-adopting it: %s", e)
                continue
            if rec is None:
                # A start that never completed: what it spawned, if it got that far.
                self._end_run(run_dir, "its start never completed")
                continue
            if run_dir.name not in self.instances:
                why = "it is no longer configured"
                process.end_if_same(rec.pid, rec.start_time, f"vmm of {run_dir.name}: {why}")
                self._end_run(run_dir, why)
                continue
            records[run_dir.name] = rec
        return records

    @staticmethod
    def _end_run(run_dir: Path, why: str) -> None:
        """End what a run spawned (its VMM, its file server), each if it is still that
        process, and wait until they are gone; then remove the run's directory."""
        for name in PID_FILES:
            process.end_recorded(run_dir / name, f"{name.split('.')[0]} of {run_dir.name}: {why}")
        shutil.rmtree(run_dir, ignore_errors=True)

    async def adopt_all(self, records: dict[str, RunRecord]) -> None:
        await asyncio.gather(*(self.instances[n].adopt(r) for n, r in records.items()))

    async def detach_all(self) -> None:
        """Leave every VMM running (daemon exit, not system shutdown)."""
        for inst in self.instances.values():
            await inst.detach()

    async def close(self) -> None:
        for task in list(self._restart_tasks.values()):
            task.cancel()
        # The runs' own tasks ended with detach_all.
