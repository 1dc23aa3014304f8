"""The pytest plugin of lukv-compile: `pytest --lukv-model MODEL` runs lukv's property suite on that model.

    pytest --lukv-model path/to/saved_model [--lukv-profile my-profile.safetensors] [--lukv-max-examples 10]

MODEL is a saved transformers model folder, a name `lukv_compile.models` knows, or `package.module:factory`.
Installing lukv-compile installs the plugin (the `pytest11` entry point). Without --lukv-model it does
nothing and imports nothing of lukv or torch, so it costs other test runs no time. The suite is one item per
property of `lukv_compile.testing.PROPERTIES`, the touch-point canary first: when it fails (an upgrade moved
a private API lukv relies on) the model properties are skipped, so the failure says that before any model runs.
"""

from __future__ import annotations

import pytest

SUBJECT = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lukv", "lukv-compile: property suite for your model")
    group.addoption("--lukv-model", default=None, metavar="MODEL",
                    help="run lukv's property suite on MODEL: a saved transformers folder, a name lukv knows "
                         "(smollm2, gemma3) or package.module:factory")
    group.addoption("--lukv-profile", default=None, metavar="FILE", help="the model's LU-KV profile (default: "
                    "uniform budgets)")
    group.addoption("--lukv-max-examples", type=int, default=10, metavar="N",
                    help="hypothesis examples per property (default 10)")
    group.addoption("--lukv-inner", default=None, choices=("inductor", "aot_eager", "eager"),
                    help="the compiler after lukv's pass (default: lukv's default, inductor)")


class LukvSuite(pytest.Collector):
    """The property suite for the model given with --lukv-model."""

    def collect(self):
        from lukv_compile.testing import PROPERTIES

        return [LukvProperty.from_parent(self, name=name) for name in PROPERTIES]


class LukvProperty(pytest.Item):
    """One lukv property on the model under test."""

    def runtest(self) -> None:
        from lukv_compile.testing import check_property

        state = self.config.stash.setdefault(SUBJECT, {})
        if self.name == "touch_points":
            state["touch_points_failed"] = True
            check_property(self.name, None)
            state["touch_points_failed"] = False
            return
        if state.get("touch_points_failed"):
            pytest.skip("lukv's touch-points into torch / transformers broke (the touch_points property says which)")
        check_property(self.name, subject(self.config, state))

    def repr_failure(self, excinfo, style=None):
        from lukv_compile.testing import PropertyFailed

        if isinstance(excinfo.value, PropertyFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"lukv property {self.name}"


def subject(config: pytest.Config, state: dict):
    """The model under test, loaded once for the session (a loading error is raised by every property)."""
    if "subject" not in state:
        from lukv_compile.testing import load_subject

        try:
            state["subject"] = load_subject(config.getoption("lukv_model"), config.getoption("lukv_profile"),
                                            config.getoption("lukv_max_examples"), config.getoption("lukv_inner"))
        except Exception as e:  # noqa: BLE001  (reported by every property, not as a crash of the session)
            state["subject"] = e
    if isinstance(state["subject"], Exception):
        raise state["subject"]
    return state["subject"]


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselect: they apply to the suite's items too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    model = config.getoption("lukv_model")
    if model:
        items[:0] = LukvSuite.from_parent(session, name=f"lukv[{model}]").collect()
