"""The loop's semantics, rule by rule, with a fake generator and a scripted critic."""
import itertools

import pytest
from PIL import Image

from gcr.loop import Job, run_loop
from gcr.records import LoopSettings
from gcr.rewrite import RefinedRequestRewriter
from tests.fakes import FakeGenerator, ScriptedCritic, critique_text


class ListSink:
    def __init__(self):
        self.stages, self.rounds, self.done = [], [], []

    def stage(self, round_index, stage, jobs):
        self.stages.append((round_index, stage, len(jobs)))

    def round_done(self, job, round_, images):
        assert len(images) == len(round_.candidates)
        self.rounds.append((job.id, round_))
        return round_

    def job_done(self, job):
        self.done.append(job.id)


def run(script, settings=LoopSettings(), task="t2i", jobs=None, generator=None, clock=None):
    jobs = jobs or [Job("run-1", "a fox reading a newspaper", settings)]
    gen, critic, sink = generator or FakeGenerator(task), ScriptedCritic(script, task), ListSink()
    kwargs = {"clock": clock} if clock else {}
    run_loop(jobs, gen, critic, RefinedRequestRewriter(), sink, task, **kwargs)
    return jobs, gen, critic, sink


def by_round(scores):
    """A critic whose verdict depends only on which round it is asked about."""
    def script(request, call, image):
        tf, pq = scores[min(call, len(scores)) - 1]
        return critique_text(tf, pq, refined=f"refined after call {call}")
    return script


def test_constant_low_critique_refines_then_stops_on_plateau_with_first_round_best():
    low = critique_text(2.0, 2.5, refined="a red fox in a tweed jacket reading the morning paper")
    # reseed: round 3 would repeat round 2 (same prompt, same seeds); the default stops there (converged)
    (job,), gen, critic, _ = run(lambda *a: low, LoopSettings(on_converged="reseed"))
    assert job.rounds[0].prompt == "a fox reading a newspaper"
    assert job.rounds[1].prompt == "a red fox in a tweed jacket reading the morning paper"
    assert job.stop_reason == "plateau"
    assert len(job.rounds) == 3  # patience 2: no gain over rounds 2 and 3
    from gcr.decide import best_round
    assert best_round(job.rounds) == 1  # ties go to the earlier round


def test_always_high_critique_stops_after_round_one_on_target():
    (job,), gen, _, _ = run(lambda *a: critique_text(4.0, 3.75))
    assert [r.index for r in job.rounds] == [1]
    assert job.stop_reason == "target"


def test_target_needs_every_applicable_dimension_and_ignores_na():
    (job,), _, _, _ = run(lambda *a: critique_text(4.0, 3.4, tr="N/A"), LoopSettings(rounds=2))
    assert job.stop_reason == "max_rounds"  # 3.4 < 3.5 keeps it going
    (job,), _, _, _ = run(lambda *a: critique_text(3.6, 3.5, tr="N/A"), LoopSettings(rounds=2))
    assert job.stop_reason == "target"


def test_each_round_uses_the_previous_rounds_refined_request():
    (job,), gen, _, _ = run(by_round([(2, 2), (2.5, 2.5), (3, 3), (3.2, 3.2)]), LoopSettings(rounds=4))
    assert [r.prompt for r in job.rounds] == [
        "a fox reading a newspaper", "refined after call 1", "refined after call 2", "refined after call 3"]
    assert [c[0].prompt for c in gen.calls] == [r.prompt for r in job.rounds]
    assert job.stop_reason == "max_rounds"


def test_every_round_is_judged_against_the_original_request():
    (job,), _, critic, _ = run(by_round([(2, 2), (2.5, 2.5), (3, 3)]), LoopSettings(rounds=3))
    assert all(req.request == "a fox reading a newspaper" for call in critic.calls for req in call)


def test_best_round_is_the_highest_not_the_last():
    from gcr.decide import best_round
    (job,), _, _, _ = run(by_round([(2, 2), (3, 3), (2.5, 2.5)]), LoopSettings(rounds=3, patience=5))
    assert [r.overall for r in job.rounds] == [2.0, 3.0, 2.5]
    assert best_round(job.rounds) == 2


def test_plateau_counts_only_gains_of_at_least_min_delta():
    scores = [(2, 2), (2.02, 2.02), (2.04, 2.04), (3, 3)]
    (job,), _, _, _ = run(by_round(scores), LoopSettings(rounds=4, patience=2, min_delta=0.05))
    assert job.stop_reason == "plateau" and len(job.rounds) == 3
    (job,), _, _, _ = run(by_round(scores), LoopSettings(rounds=4, patience=2, min_delta=0.01))
    assert job.stop_reason == "max_rounds" and len(job.rounds) == 4


def test_time_budget_stops_between_rounds():
    ticks = itertools.count(step=10.0)  # every clock read advances 10 s
    (job,), _, _, _ = run(by_round([(2, 2), (2.5, 2.5), (3, 3), (3.2, 3.2)]),
                          LoopSettings(rounds=4, time_budget=25), clock=lambda: next(ticks))
    assert job.stop_reason == "time_budget"
    assert len(job.rounds) == 1  # one round takes 30 s of fake time


def test_candidates_are_all_critiqued_and_the_best_is_the_rounds_result():
    def script(request, call, image):
        r = image.getpixel((0, 0))[0]
        return critique_text(1 + 3 * r / 255, 2.0, refined=f"from red {r}")
    (job,), gen, critic, _ = run(script, LoopSettings(rounds=1, candidates=3, seed=7))
    (round1,) = job.rounds
    assert [c.seed for c in round1.candidates] == [7, 8, 9]
    assert len(gen.calls) == 1 and len(gen.calls[0]) == 3   # one batched generate
    assert len(critic.calls) == 1 and len(critic.calls[0]) == 3  # one batched critique
    overalls = [c.overall for c in round1.candidates]
    assert round1.overall == max(overalls)
    assert round1.chosen == overalls.index(max(overalls))
    assert round1.next_prompt == round1.candidates[round1.chosen].refined_request


@pytest.mark.parametrize("policy,expected", [("fixed", [[5, 6], [5, 6], [5, 6]]),
                                             ("vary", [[5, 6], [7, 8], [9, 10]])])
def test_seed_policy(policy, expected):
    (job,), gen, _, _ = run(by_round([(2, 2), (2.5, 2.5), (3, 3)]),
                            LoopSettings(rounds=3, candidates=2, seed=5, seed_policy=policy))
    assert [[r.seed for r in call] for call in gen.calls] == expected


def test_unreadable_critique_is_retried_once_then_recorded_unscored_and_prompt_kept():
    garbage = "\n\n\nlorem ipsum ## Score"
    (job,), _, critic, _ = run(lambda *a: garbage, LoopSettings(rounds=2))
    assert critic.retries == 2  # once per round
    for r in job.rounds:
        assert r.overall is None and r.raw_critique == garbage and r.result.attempts == 2
    assert job.rounds[1].prompt == job.rounds[0].prompt == "a fox reading a newspaper"
    assert "unreadable" in job.rounds[0].rewrite_note
    assert job.stop_reason == "max_rounds"


def test_retry_that_reads_well_is_used():
    def script(request, call, image):
        return "garbage" if call == 1 else critique_text(3.0, 3.0, refined="better")
    (job,), _, critic, _ = run(script, LoopSettings(rounds=1))
    assert job.rounds[0].overall == 3.0 and job.rounds[0].result.attempts == 2
    assert job.rounds[0].next_prompt == "better"


def test_empty_refined_request_keeps_the_prompt_and_says_why():
    (job,), _, _, _ = run(lambda *a: critique_text(2, 2, refined=""), LoopSettings(rounds=2))
    assert job.rounds[1].prompt == job.rounds[0].prompt
    assert "no refined request" in job.rounds[0].rewrite_note


def test_edit_rounds_always_edit_the_source_image():
    source = Image.new("RGB", (16, 16), (10, 20, 30))
    jobs = [Job("e", "make the sky stormy", LoopSettings(rounds=3, patience=5), source_image=source)]
    _, gen, critic, _ = run(by_round([(2, 2), (2.5, 2.5), (3, 3)]), jobs=jobs, task="edit",
                            generator=FakeGenerator("edit"))
    assert all(r.source_image is source for call in gen.calls for r in call)
    assert all(r.source_image is source for call in critic.calls for r in call)


def test_a_set_of_jobs_advances_together_and_stopped_jobs_leave():
    def script(request, call, image):
        return critique_text(4, 4) if request == "easy" else critique_text(2, 2 + call / 10, refined=request + "!")
    # reseed: "hard!" is proposed again after round 2; the default would stop b and c there (converged)
    again = LoopSettings(rounds=3, patience=5, on_converged="reseed")
    jobs = [Job("a", "easy", LoopSettings(rounds=3)), Job("b", "hard", again), Job("c", "harder", again)]
    _, gen, critic, sink = run(script, jobs=jobs)
    assert [len(call) for call in gen.calls] == [3, 2, 2]
    assert [len(call) for call in critic.calls] == [3, 2, 2]
    assert [j.stop_reason for j in jobs] == ["target", "max_rounds", "max_rounds"]
    assert sink.done == ["a", "b", "c"]


def test_a_failing_job_does_not_sink_the_others():
    jobs = [Job("ok", "a cat", LoopSettings(rounds=2, patience=5)),
            Job("bad", "a forbidden cat", LoopSettings(rounds=2, patience=5))]
    _, gen, _, _ = run(by_round([(2, 2), (3, 3)]), jobs=jobs, generator=FakeGenerator(fail_on="forbidden"))
    ok, bad = jobs
    assert bad.stop_reason == "error" and "cannot draw forbidden" in bad.error
    assert bad.rounds[0].error and not bad.rounds[0].candidates
    assert ok.stop_reason == "max_rounds" and len(ok.rounds) == 2 and ok.error is None


def test_single_job_generation_failure_is_recorded_not_raised():
    (job,), _, _, _ = run(by_round([(2, 2)]), generator=FakeGenerator(fail_on="fox"))
    assert job.stop_reason == "error" and job.rounds[0].error.startswith("generation failed")


def test_resumed_job_continues_from_its_last_round():
    first, _, _, _ = run(by_round([(2, 2), (2.5, 2.5)]), LoopSettings(rounds=2, patience=5))
    done = first[0].rounds
    # reseed: the new critic numbers its calls from 1 again, so it proposes round 2's prompt once more
    resumed = [Job("run-1", "a fox reading a newspaper", LoopSettings(rounds=4, patience=5, on_converged="reseed"),
                   rounds=done[:1])]
    (job,), gen, _, _ = run(by_round([(2.5, 2.5), (3, 3), (3.1, 3.1)]), jobs=resumed)
    assert [r.index for r in job.rounds] == [1, 2, 3, 4]
    assert job.rounds[1].prompt == done[0].next_prompt
    assert len(gen.calls) == 3


def test_job_already_finished_is_not_run_again():
    first, _, _, _ = run(lambda *a: critique_text(4, 4))
    (job,), gen, _, sink = run(lambda *a: critique_text(4, 4),
                               jobs=[Job("run-1", "x", LoopSettings(), rounds=list(first[0].rounds))])
    assert gen.calls == [] and job.stop_reason == "target" and sink.done == ["run-1"]


class BreakingCritic(ScriptedCritic):
    """Raises `error` for any batch holding a request whose image colour matches `bad`, else scripts."""

    def __init__(self, script, error, bad=None):
        super().__init__(script)
        self.error, self.bad = error, bad

    def critique(self, requests, retry=False):
        if self.bad is None or any(r.request == self.bad for r in requests):
            self.calls.append(list(requests))
            raise self.error
        return super().critique(requests, retry)


def test_a_critic_failure_is_recorded_with_the_images_kept_not_raised():
    job = Job("run-1", "a fox", LoopSettings(candidates=2))
    sink = ListSink()
    run_loop([job], FakeGenerator(), BreakingCritic(None, RuntimeError("server said no")),
             RefinedRequestRewriter(), sink, "t2i")
    [r] = job.rounds
    assert job.stop_reason == "error" and "server said no" in job.error
    assert r.error.startswith("critique failed") and len(r.candidates) == 2  # both images kept
    assert all(c.overall is None for c in r.candidates)
    assert sink.done == ["run-1"]


def test_one_job_breaking_the_batched_critique_does_not_sink_the_others():
    good = critique_text(4.0, 4.0)
    jobs = [Job(f"run-{i}", p, LoopSettings()) for i, p in enumerate(["a fox", "a poison pill", "a cat"])]
    critic = BreakingCritic(lambda *a: good, ValueError("image too large"), bad="a poison pill")
    run_loop(jobs, FakeGenerator(), critic, RefinedRequestRewriter(), ListSink(), "t2i")
    assert [j.stop_reason for j in jobs] == ["target", "error", "target"]
    assert "image too large" in jobs[1].error


def test_an_unavailable_critic_fails_the_group_at_once_without_retrying_job_by_job():
    from gcr.errors import CriticUnavailable

    jobs = [Job(f"run-{i}", p, LoopSettings()) for i, p in enumerate(["a fox", "a cat", "a dog"])]
    critic = BreakingCritic(None, CriticUnavailable("the critic server is down"))
    run_loop(jobs, FakeGenerator(), critic, RefinedRequestRewriter(), ListSink(), "t2i")
    assert [j.stop_reason for j in jobs] == ["error"] * 3
    assert len(critic.calls) == 1


def cut_off(tf, refined=None):
    """A critique that stops after its first dimension (and, optionally, still has a Refined Request)."""
    text = f"# Detailed Judgement\n1. Text Faithfulness:\n## Justification: ok.\n## Score: {tf}"
    return text + (f"\n# User Request Refinement:\n## Refined Request: {refined}" if refined else "")


def test_the_rewriter_uses_an_incomplete_critiques_refined_request_and_says_so():
    (job,), _, critic, _ = run(lambda *a: cut_off(2.0, refined="a fox in a red scarf"), LoopSettings(rounds=2))
    assert critic.retries == 2 and not job.rounds[0].complete
    assert job.rounds[1].prompt == "a fox in a red scarf"
    assert "incomplete" in job.rounds[0].rewrite_note and "physical_quality" in job.rounds[0].rewrite_note


def test_a_first_complete_critique_after_incomplete_ones_is_an_improvement_not_a_plateau():
    def script(request, call, image):  # calls 1-4: rounds 1-2 incomplete (and their retries); then complete
        return cut_off(4.0) if call <= 4 else critique_text(3.0, 3.0)
    (job,), _, _, _ = run(script, LoopSettings(rounds=4, patience=2, target=3.9))
    assert [r.complete for r in job.rounds[:3]] == [False, False, True]
    assert job.stop_reason == "max_rounds" and len(job.rounds) == 4  # round 3 counted as progress
    from gcr.decide import best_round
    assert best_round(job.rounds) == 3  # complete 3.0 beats incomplete 4.0
