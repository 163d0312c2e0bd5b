"""No round is ever repeated: a round whose prompt and seeds equal an earlier round's is never run.

By default a critic that proposes a prompt already run (with the seeds the policy gives next) stops
the run as `converged`; `on_converged="reseed"` spends the remaining rounds on fresh seeds; a prompt
kept because the critique proposed nothing usable always runs again with fresh seeds.
"""
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from gcr.decide import round_seeds
from gcr.loop import Job, run_loop
from gcr.records import LoopSettings
from gcr.rewrite import RefinedRequestRewriter
from tests.fakes import FakeGenerator, ScriptedCritic, critique_text
from tests.test_loop import ListSink

REQUEST = "a fox reading a newspaper"
STUCK = "a red fox on a park bench reading a newspaper"


def run(script, settings, rounds=()):
    job = Job("run-1", REQUEST, settings, rounds=list(rounds))
    gen, critic = FakeGenerator(), ScriptedCritic(script)
    run_loop([job], gen, critic, RefinedRequestRewriter(), ListSink(), "t2i")
    return job, gen


def pairs(job):
    return [(r.prompt, tuple(c.seed for c in r.candidates)) for r in job.rounds]


def assert_no_repeat(job, gen):
    assert len(set(pairs(job))) == len(job.rounds), pairs(job)
    generated = [(r.prompt, r.seed) for call in gen.calls for r in call]
    assert len(set(generated)) == len(generated), generated  # not one image was drawn twice


def stuck_after_first(request, call, image):
    """The critic's refined request stops changing after round 1 (low scores: no target, no plateau yet)."""
    return critique_text(2.0 + call / 100, 2.0, refined=STUCK)


@pytest.mark.parametrize("policy", ["fixed", "vary"])
@pytest.mark.parametrize("candidates", [1, 3])
def test_default_stops_as_converged_instead_of_repeating_a_round(policy, candidates):
    job, gen = run(stuck_after_first, LoopSettings(rounds=6, patience=10, candidates=candidates, seed=11,
                                                   seed_policy=policy))
    assert_no_repeat(job, gen)
    if policy == "fixed":  # round 3 would be round 2 again: same prompt, same seeds
        assert job.stop_reason == "converged" and len(job.rounds) == 2
        assert [r.prompt for r in job.rounds] == [REQUEST, STUCK]
    else:  # new seeds every round: the same prompt never repeats a round
        assert job.stop_reason == "max_rounds" and len(job.rounds) == 6


@pytest.mark.parametrize("policy", ["fixed", "vary"])
@pytest.mark.parametrize("candidates", [1, 2])
def test_reseed_spends_the_remaining_rounds_on_fresh_seeds(policy, candidates):
    settings = LoopSettings(rounds=5, patience=10, candidates=candidates, seed=3, seed_policy=policy,
                            on_converged="reseed")
    job, gen = run(stuck_after_first, settings)
    assert job.stop_reason == "max_rounds" and len(job.rounds) == 5
    assert [r.prompt for r in job.rounds] == [REQUEST] + [STUCK] * 4
    assert_no_repeat(job, gen)
    seeds = [tuple(c.seed for c in r.candidates) for r in job.rounds]
    assert all(len(s) == candidates for s in seeds)
    if policy == "fixed":  # round 1 and 2 keep the fixed seeds (the prompt changed), then fresh ones
        assert seeds[0] == seeds[1] == tuple(settings.seed_set(0))
        assert seeds[2:] == [tuple(settings.seed_set(k)) for k in (1, 2, 3)]


def test_a_prompt_kept_for_an_unreadable_critique_runs_again_with_fresh_seeds_not_as_convergence():
    job, gen = run(lambda *a: "no critique here", LoopSettings(rounds=3, seed=5))
    assert job.stop_reason == "max_rounds"
    assert [r.prompt for r in job.rounds] == [REQUEST] * 3
    assert [r.seed for r in job.rounds] == [5, 6, 7]
    assert_no_repeat(job, gen)


def test_a_prompt_kept_for_want_of_a_refined_request_also_gets_fresh_seeds():
    job, gen = run(lambda *a: critique_text(2.0, 2.0, refined=""), LoopSettings(rounds=3, patience=10, seed=0))
    assert [r.seed for r in job.rounds] == [0, 1, 2] and job.stop_reason == "max_rounds"
    assert_no_repeat(job, gen)


def test_a_cycle_back_to_an_earlier_prompt_is_convergence_too():
    def script(request, call, image):  # A -> B -> A: round 3 would repeat round 1
        return critique_text(2.0, 2.0, refined="prompt B" if call % 2 else REQUEST)
    job, gen = run(script, LoopSettings(rounds=6, patience=10))
    assert [r.prompt for r in job.rounds] == [REQUEST, "prompt B"]
    assert job.stop_reason == "converged"


def test_resume_repeats_the_reseeded_seeds():
    settings = LoopSettings(rounds=5, patience=10, seed=9, on_converged="reseed")
    whole, _ = run(stuck_after_first, settings)
    resumed, gen = run(stuck_after_first, settings, rounds=whole.rounds[:3])
    assert pairs(resumed) == pairs(whole)
    assert [r.seed for call in gen.calls for r in call] == [r.seed for r in whole.rounds[3:]]


def test_round_seeds_is_a_pure_function_of_the_stored_rounds():
    settings = LoopSettings(rounds=5, patience=10, seed=9, candidates=2, on_converged="reseed")
    job, _ = run(stuck_after_first, settings)
    for k in range(1, len(job.rounds)):
        r = job.rounds[k]
        assert round_seeds(settings, job.rounds[:k], r.prompt, r.index) == [c.seed for c in r.candidates]


# A critic choosing each refined request from a tiny pool (so prompts recur, in cycles too), sometimes
# with no refined request or an unreadable text: whatever it does, no two rounds share prompt and seeds.
POOL = ["", REQUEST, "prompt B", "prompt C", "<unreadable>"]


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(choices=st.lists(st.sampled_from(POOL), min_size=1, max_size=12),
       policy=st.sampled_from(["fixed", "vary"]), candidates=st.integers(1, 3),
       on_converged=st.sampled_from(["stop", "reseed"]), rounds=st.integers(1, 12))
def test_no_two_rounds_ever_share_prompt_and_seeds(choices, policy, candidates, on_converged, rounds):
    def script(request, call, image):
        pick = choices[(call - 1) % len(choices)]
        return "garbage" if pick == "<unreadable>" else critique_text(2.0, 2.0, refined=pick)
    settings = LoopSettings(rounds=rounds, patience=100, candidates=candidates, seed=1, seed_policy=policy,
                            on_converged=on_converged)
    job, gen = run(script, settings)
    assert_no_repeat(job, gen)
    assert job.stop_reason in ("max_rounds", "converged")
    if job.stop_reason == "converged":
        assert on_converged == "stop" and len(job.rounds) < rounds
