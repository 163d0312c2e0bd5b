"""The memory plan: which plan each GPU size gets, the retry ladder, and applying a plan to real models."""
import pytest

from gcr.errors import UsageError
from gcr.memory import (CRITIC_CPU, GiB, LADDER, OFFLOAD_GROUP, OFFLOAD_MODEL, RESIDENT, SWAP, Footprint,
                        apply_plan, choose_plan, critic_footprint, generator_footprint, make_plan,
                        more_conservative, plan_needs)

KONTEXT = generator_footprint("flux-kontext", 1024, 1024)
CRITIC = critic_footprint("rationalrewards-edit")


def test_footprints_come_from_the_published_sizes():
    assert KONTEXT.weights / 1e9 == pytest.approx(33.7, abs=0.1)      # DiT + T5-XXL + CLIP-L + VAE, bf16
    assert KONTEXT.largest / 1e9 == pytest.approx(23.8, abs=0.1)      # the 12B DiT
    assert CRITIC.weights / 1e9 == pytest.approx(17.5, abs=0.1)
    assert critic_footprint(batch=8).activations > CRITIC.activations  # the KV cache grows with the batch
    assert generator_footprint("flux-kontext", 2048, 2048).activations > KONTEXT.activations


@pytest.mark.parametrize("free_gb, plan, offload, critic_device", [
    (80, RESIDENT, "none", "gpu"),          # H100 / A100 80 GB: both resident
    (48, OFFLOAD_MODEL, "model", "gpu"),    # 48 GB: critic + the DiT at once, T5 comes and goes
    (40, SWAP, "none", "gpu"),              # either model fits alone, not with the other
    (24, OFFLOAD_GROUP, "group", "gpu"),    # critic resident, the generator streams from pinned RAM
    (16, CRITIC_CPU, "group", "cpu"),       # the critic alone does not fit
    (8, CRITIC_CPU, "group", "cpu"),
])
def test_the_fastest_plan_that_fits_is_chosen(free_gb, plan, offload, critic_device):
    chosen = choose_plan(free_gb * GiB, KONTEXT, CRITIC)
    assert (chosen.name, chosen.generator_offload, chosen.critic_device) == (plan, offload, critic_device)
    assert chosen.need_bytes <= chosen.free_bytes == free_gb * GiB
    assert chosen.swap == (plan == SWAP)
    assert plan in chosen.describe() and f"{free_gb:.1f} GB free" in chosen.describe()
    faster = LADDER[:LADDER.index(plan)]
    assert all(plan_needs(f, KONTEXT, CRITIC) > free_gb * GiB for f in faster)


def test_a_served_critic_leaves_the_gpu_to_the_generator():
    assert choose_plan(40 * GiB, KONTEXT, None).name == RESIDENT
    assert choose_plan(24 * GiB, KONTEXT, None).name == OFFLOAD_GROUP
    plan = choose_plan(8 * GiB, KONTEXT, None)
    assert plan.name == OFFLOAD_GROUP and not plan.critic_in_process and "served" in plan.reason


def test_too_small_a_gpu_is_a_clear_error():
    with pytest.raises(UsageError, match="--device cpu"):
        choose_plan(2 * GiB, KONTEXT, CRITIC)


def test_an_explicit_plan_is_kept_even_if_estimated_not_to_fit():
    plan = choose_plan(24 * GiB, KONTEXT, CRITIC, requested=RESIDENT)
    assert plan.name == RESIDENT and plan.need_bytes > plan.free_bytes
    with pytest.raises(UsageError, match="--memory must be one of"):
        choose_plan(24 * GiB, KONTEXT, CRITIC, requested="magic")


def test_swap_and_cpu_plans_load_the_critic_in_bf16_on_the_cpu():
    assert choose_plan(40 * GiB, KONTEXT, CRITIC).critic_load_device == "cpu"
    assert choose_plan(40 * GiB, KONTEXT, CRITIC).critic_load_dtype == "bf16"
    assert choose_plan(8 * GiB, KONTEXT, CRITIC).critic_load_device == "cpu"
    assert choose_plan(80 * GiB, KONTEXT, CRITIC).critic_load_device is None


def test_more_conservative_walks_down_the_ladder_once_per_call():
    plan = choose_plan(80 * GiB, KONTEXT, CRITIC)
    names = [plan.name]
    while (plan := more_conservative(plan)) is not None:
        names.append(plan.name)
        assert "retry after running out of memory" in plan.reason
    assert tuple(names) == LADDER
    served = make_plan(RESIDENT, 80 * GiB, KONTEXT, None)
    assert more_conservative(served).name == OFFLOAD_MODEL
    assert more_conservative(more_conservative(served)).name == OFFLOAD_GROUP
    assert more_conservative(more_conservative(more_conservative(served))) is None


# -- applying a plan (CPU: the moves are real, the GPU is played by the CPU) -----------------------------


class FakeModule:
    def __init__(self, device):
        self.device = device
        self.moves = []

    def to(self, device):
        self.device = device
        self.moves.append(device)
        return self

    def enable_group_offload(self, onload_device, **options):
        self.device = f"group->{onload_device}"
        self.moves.append(self.device)


class Gen:
    id, task, offload = "gen", "t2i", "none"

    def __init__(self):
        self.pipe = FakeModule("cuda")
        self.calls = []

    def generate(self, requests):
        self.calls.append(self.pipe.device)
        return ["image"]

    def with_settings(self, settings):
        return self


class Crit:
    id, task = "critic", "t2i"

    def __init__(self):
        self.model = FakeModule("cpu")
        self.fast = type("F", (), {"resets": 0, "reset": lambda self: setattr(self, "resets", self.resets + 1)})()
        self.calls = []

    def critique(self, requests, retry=False):
        self.calls.append(self.model.device)
        return ["text"]


def test_swap_puts_each_model_on_the_gpu_only_while_it_runs():
    generator, critic = Gen(), Crit()
    plan = choose_plan(40 * GiB, KONTEXT, CRITIC)
    g, c = apply_plan(plan, generator, critic, device="cuda")
    assert g.id == "gen" and c.task == "t2i"            # the wrappers pass everything else through
    for _ in range(2):
        g.generate(["r"])
        assert generator.pipe.device == "cuda" and critic.model.device == "cpu"
        c.critique(["r"])
        assert generator.pipe.device == "cpu" and critic.model.device == "cuda"
    assert generator.calls == ["cuda", "cuda"] and critic.calls == ["cuda", "cuda"]
    assert critic.fast.resets >= 2                        # its CUDA graphs hold old weight addresses
    assert g.with_settings(None) is g
    # Retrying under the next plan unwraps the swap and re-places both models.
    g2, c2 = apply_plan(more_conservative(plan), g, c, device="cuda")
    assert g2 is not g and g2 is generator and c2 is critic
    assert generator.offload == "group" and generator.pipe.device == "group->cuda"
    assert critic.model.device == "cuda"


def test_resident_plan_leaves_models_unwrapped():
    generator, critic = Gen(), Crit()
    g, c = apply_plan(choose_plan(80 * GiB, KONTEXT, CRITIC), generator, critic, device="cuda")
    assert g is generator and c is critic and critic.model.device == "cuda"


def test_footprint_is_plain_data():
    assert Footprint(1, 1, 1) == Footprint(1, 1, 1)
