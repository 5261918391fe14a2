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
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from spectrumd.errors import (
    Exists,
    Failed,
    InvalidArgument,
    InvalidState,
    NoSuchApplication,
    NoSuchInstance,
    NoSuchResource,
)
from spectrumd.model.config import (
    Config,
    instance_to_json,
    load_config,
    parse_instance,
    resolve_auto_vmm,
    validate_name,
)
from spectrumd.model.types import InstanceDef, Resource
from spectrumd.supervisor.instance import Environment, Instance
from spectrumd.vmm import crosvm_available

log = logging.getLogger(__name__)

DATA_FILE = "instances.json"
CREATE_OPTIONS = frozenset({"vmm", "accel", "stop_timeout"})

InstanceListener = Callable[[Instance], None]


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        self.config = self._load()
        self.instances: dict[str, Instance] = {}
        self.on_added: list[InstanceListener] = []
        self.on_removed: list[InstanceListener] = []
        self.on_changed: list[Callable[[Instance, frozenset[str]], None]] = []
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
        if inst.removed and not inst.active and self.instances.get(inst.name) is inst:
            log.info(
                "removing %s, dropped from the configuration and now %s", inst.name, inst.state
            )
            self._remove(inst)

    # -- reload ------------------------------------------------------------

    def reload(self) -> tuple[list[str], list[str], list[str]]:
        """Re-read the configuration and apply the difference.

        Returns (added, removed, changed) names. Raises ConfigError (an
        InvalidArgument) and keeps the running configuration if the file is bad.
        """
        new = self._load()
        return self._apply(new)

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
            _write_atomically(self.data_path, json.dumps(body, indent=2) + "\n")
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
        """Stop every active instance, in parallel."""

        async def stop_one(inst: Instance) -> None:
            with contextlib.suppress(InvalidState):
                await inst.stop()

        await asyncio.gather(
            *(stop_one(i) for i in self.instances.values() if i.active), return_exceptions=True
        )

    async def close(self) -> None:
        for inst in self.instances.values():
            await inst.shutdown_tasks()
