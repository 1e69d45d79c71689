"""VersionController: the deadline invariant (DESIGN.md "Version rules"), including the schedule that
deadlocks a naive staleness gate, and RolloutConfig validation."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dora.rollout.config import RolloutConfig
from dora.rollout.controller import VersionController


def brute_force_holds(groups: dict[int, int], n: int, B: int) -> bool:
    deadlines = list(groups.values())
    if any(d < n for d in deadlines):
        return False
    return all(sum(d <= D for d in deadlines) <= (D - n + 1) * B for D in range(n, max(deadlines, default=n) + 1))


def test_k0_is_synchronous():
    c = VersionController(0, 2)
    c.admit(0, 0)
    c.admit(1, 0)
    assert not c.can_admit(0)
    c.finish(0)
    assert c.plan_batch() is None  # both groups of the step must be done
    c.finish(1)
    assert c.plan_batch() == [0, 1]
    c.consume([0, 1])
    assert not c.can_admit(0)  # step 0 runs: nothing may be admitted until version 1 exists
    c.publish(1)
    assert c.slack(1) == 2


def test_naive_gate_deadlock_schedule():
    """k = 2, B = 1: three groups admitted on version 0, a version-1 group finishing first."""
    c = VersionController(2, 1)
    for gid in (0, 1, 2):  # a, b, c on version 0: deadline 2 each
        c.admit(gid, 0)
    assert not c.can_admit(0)
    c.finish(0)
    assert c.plan_batch() == [0]
    c.consume([0])  # step 0 trained a
    c.publish(1)
    assert c.slack(1) == 1
    c.admit(3, 1)  # d on version 1, deadline 3
    c.finish(3)
    # A naive gate ("any finished group within staleness") would train d at step 1 and leave b and c,
    # both due at step 2, for one remaining step: one of them would be trained late or dropped.
    assert c.plan_batch() is None
    assert c.blocker().group_id == 1
    c.finish(2)
    assert c.plan_batch() == [2]  # the earliest deadline, not d
    c.consume([2])
    c.finish(1)
    assert c.plan_batch() == [1]
    c.consume([1])  # step 2 trains b: on its deadline
    assert c.plan_batch() == [3]
    c.consume([3])
    assert c.num_unconsumed == 0 and c.next_step == 4


class NaiveGate:
    """The gate the controller replaces: cap groups in flight at (k+1)B, train any finished group
    whose staleness is within k, first finished first."""

    def __init__(self, k: int, B: int) -> None:
        self.k, self.B, self.in_flight, self.finished = k, B, {}, []

    def admit(self, gid: int, version: int) -> bool:
        if len(self.in_flight) >= (self.k + 1) * self.B:
            return False
        self.in_flight[gid] = version
        return True

    def take(self, step: int) -> list[int]:
        ok = [g for g in self.finished if step - self.in_flight[g] <= self.k][: self.B]
        for g in ok:
            self.finished.remove(g)
            del self.in_flight[g]
        return ok


def test_naive_gate_breaks_the_bound_on_this_schedule():
    gate = NaiveGate(2, 1)
    assert all(gate.admit(g, 0) for g in (0, 1, 2))
    gate.finished.append(0)
    assert gate.take(0) == [0]
    assert gate.admit(3, 1)
    gate.finished.append(3)
    assert gate.take(1) == [3]  # the mistake: b and c are now both due at step 2
    gate.finished += [1, 2]
    assert gate.take(2) == [1]
    assert gate.take(3) == []  # c can never be trained within k: dropped, or the trainer waits forever
    assert gate.in_flight == {2: 0}


@given(st.integers(0, 4), st.integers(1, 4), st.lists(st.tuples(st.sampled_from(["admit", "finish", "step", "publish"]),
                                                              st.integers(0, 6)), max_size=60))
def test_slack_matches_brute_force(k, B, ops):
    c = VersionController(k, B)
    gid = 0
    for op, x in ops:
        if op == "admit":
            version = max(0, c.newest_version - x % (k + 2))
            deadlines = {g.group_id: g.deadline for g in c.groups.values()}
            fits = brute_force_holds({**deadlines, -1: version + k}, c.next_step, B)
            assert c.can_admit(version) == fits
            if fits:
                c.admit(gid, version)
                gid += 1
        elif op == "finish":
            running = [g.group_id for g in c.groups.values() if not g.finished]
            if running:
                c.finish(running[x % len(running)])
        elif op == "step":
            plan = c.plan_batch()
            if plan is not None:
                c.consume(plan)
        elif op == "publish" and c.newest_version < c.next_step:
            c.publish(c.newest_version + 1)
        assert c.holds()
        assert brute_force_holds({g.group_id: g.deadline for g in c.groups.values()}, c.next_step, B)
        assert c.num_unconsumed <= (k + 1) * B


@pytest.mark.parametrize("kwargs, key", [
    ({"max_staleness": -1}, "rollout.max_staleness"),
    ({"batch_groups": 0}, "rollout.batch_groups"),
    ({"group_size": 0}, "rollout.group_size"),
    ({"max_regenerations": -1}, "rollout.max_regenerations"),
    ({"mode": "synchronous", "max_staleness": 2}, "rollout.max_staleness"),
    ({"mode": "one_step_off", "max_live_versions": 2}, "rollout.max_live_versions"),
    ({"mode": "bogus"}, "rollout.mode"),
    ({"on_stale": "drop"}, "rollout.on_stale"),
    ({"group_size": 8, "max_seqs_per_engine": 4}, "rollout.max_seqs_per_engine"),
])
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        RolloutConfig(**kwargs)


def test_bad_controller_args():
    with pytest.raises(ValueError, match="max_staleness"):
        VersionController(-1, 1)
    with pytest.raises(ValueError, match="batch_groups"):
        VersionController(0, 0)


def test_mode_defaults():
    assert RolloutConfig(mode="synchronous").k == 0
    assert RolloutConfig(mode="one_step_off").k == 1 and RolloutConfig(mode="one_step_off").waves
    assert RolloutConfig().max_live_versions == 2
    assert RolloutConfig(mode="partial_rollout").partial


@pytest.mark.parametrize("mode", ["multi_version", "synchronous", "one_step_off", "partial_rollout"])
def test_config_composes_through_omegaconf(mode):
    """As Hydra builds it: YAML text merged into the structured schema, then converted to the object
    (enum nodes resolve by name, __post_init__ validates)."""
    from omegaconf import OmegaConf

    yaml = f"mode: {mode}\nbatch_groups: 16\ngroup_size: 8\non_stale: regenerate\ngroup_placement: split\n"
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RolloutConfig), OmegaConf.create(yaml)))
    assert isinstance(config, RolloutConfig) and config.mode.value == mode and config.on_stale.value == "regenerate"
    with pytest.raises(ValueError, match="rollout.batch_groups"):
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RolloutConfig), {"batch_groups": 0}))
