"""Imitation of the WebUI ``modules`` package for loading ``scripts/seg.py`` in CI.

Interfaces follow AUTOMATIC1111 v1.10.1 (the same in Forge and reForge):
* ``modules/scripts.py``: ``Script`` base class, ``AlwaysVisible``, ``scripts_data`` (list of
  ``ScriptClassData(script_class, path, basedir, module)``).
* ``modules/script_callbacks.py``: ``on_ui_settings(cb)``, ``on_before_ui(cb)``, ``on_cfg_denoiser(cb)``.
* ``modules/shared.py``: ``opts`` (attribute access, ``add_option(key, OptionInfo)``), ``OptionInfo(default,
  label, component, component_args, ..., section=...)``.
* ``modules/ui_components.py``: ``InputAccordion(value, **kwargs)`` - a hidden ``gr.Checkbox`` whose value
  is the script arg, used as a context manager that opens a ``gr.Accordion`` (lines 88-144).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections import defaultdict
from pathlib import Path

import gradio as gr

ROOT = Path(__file__).resolve().parents[2]


class InputAccordion(gr.Checkbox):
    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id")
        super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        self.accordion = gr.Accordion(label=kwargs.get("label", "Accordion"), open=value, elem_id=self.accordion_id)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, *args):
        self.accordion.__exit__(*args)


class OptionInfo:
    def __init__(
        self, default=None, label="", component=None, component_args=None, onchange=None, section=None, **kwargs
    ):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = section


class Options:
    def __init__(self):
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key):
        if key in self.data:
            return self.data[key]
        if key in self.data_labels:
            return self.data_labels[key].default
        raise AttributeError(key)

    def __setattr__(self, key, value):
        self.data[key] = value


def install_fake_modules() -> types.SimpleNamespace:
    """Put a fresh imitation ``modules`` package into ``sys.modules``; returns its parts."""
    callbacks = defaultdict(list)
    modules = types.ModuleType("modules")
    scripts = types.ModuleType("modules.scripts")
    scripts.AlwaysVisible = object()
    scripts.Script = type("Script", (), {})
    scripts.scripts_data = []
    script_callbacks = types.ModuleType("modules.script_callbacks")
    for name in ("on_ui_settings", "on_before_ui", "on_cfg_denoiser", "on_script_unloaded", "on_app_started"):
        setattr(script_callbacks, name, lambda cb, *, name=None, _n=name: callbacks[_n].append(cb))
    shared = types.ModuleType("modules.shared")
    shared.opts, shared.OptionInfo = Options(), OptionInfo
    ui_components = types.ModuleType("modules.ui_components")
    ui_components.InputAccordion = InputAccordion
    parts = dict(scripts=scripts, script_callbacks=script_callbacks, shared=shared, ui_components=ui_components)
    for name, module in parts.items():
        setattr(modules, name, module)
        sys.modules[f"modules.{name}"] = module
    sys.modules["modules"] = modules
    return types.SimpleNamespace(callbacks=callbacks, **parts)


def load_script(name: str = "seg.py"):
    """Load scripts/<name> the way the WebUI does: by file path, as a module named after the file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def uninstall_fake_modules() -> None:
    for key in [k for k in sys.modules if k == "modules" or k.startswith("modules.")]:
        del sys.modules[key]
