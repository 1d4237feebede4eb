"""The daemon's policy names (flexnpu/daemon/policies.py) are the policies flexnpu.sched.policy
implements, and every front end offers exactly those."""

import argparse

import pytest

from flexnpu import cmd_run, cmd_service
from flexnpu.daemon import main as daemon_main
from flexnpu.daemon.policies import DEFAULT_POLICY, POLICY_NAMES, PolicyName, policy_arg
from flexnpu.daemon.scheduling import make_scheduler
from flexnpu.sched.policy import POLICIES, make_policy


def test_every_name_is_a_policy_class_and_every_class_has_a_name():
    assert set(POLICY_NAMES) == set(POLICIES)
    for name in POLICY_NAMES:
        assert make_policy(name).name == name
    assert DEFAULT_POLICY in POLICY_NAMES and PolicyName(DEFAULT_POLICY).value == DEFAULT_POLICY


def _policy_action(add_arguments, *sub: str) -> argparse.Action:
    p = argparse.ArgumentParser()
    add_arguments(p)
    if sub:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                p = a.choices[sub[0]]
    [act] = [a for a in p._actions if "--policy" in a.option_strings]
    return act


def test_front_ends_accept_exactly_the_registered_policies():
    for act in (
        _policy_action(daemon_main.add_arguments),
        _policy_action(cmd_run.add_arguments),
        _policy_action(cmd_service.add_arguments, "install"),
    ):
        assert act.type is policy_arg  # one parser for every front end
        for name in POLICY_NAMES:
            assert act.type(name) == name
        assert act.type("partition:0.25") == "partition:0.25"
        assert act.type("flex:0.05") == "flex:0.05"  # the TPOT-keeping variant's slack
        for bad in ("fair", "flex:-0.5", "fifo:0.5", "partition:2", ""):
            with pytest.raises(argparse.ArgumentTypeError):
                act.type(bad)


def test_the_scheduler_factory_refuses_unknown_names():
    with pytest.raises(ValueError, match="choose from fifo, priority, flex"):
        make_scheduler("round-robin", daemon=None)  # refused before the daemon is looked at
