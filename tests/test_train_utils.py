"""Pieces of the training loop: the learning rate as a function of the step, the resumable sampler,
the EMA warm-up, crash-safe saving helpers, flags."""
import argparse
import itertools

import pytest
import torch

from cli import str2bool
from script_utils import clean_state_dict
from train_utils import EMA, InfiniteShardSampler, get_lr


def test_learning_rate_schedules():
    assert get_lr(0, 1.0, 100, "linear") == 1.0
    assert get_lr(50, 1.0, 100, "linear") == 0.5
    assert get_lr(99, 1.0, 100, "linear") == pytest.approx(0.01)
    assert get_lr(100, 1.0, 100, "linear") == 0.0
    assert get_lr(0, 1.0, 100, "constant", warmup=10) == pytest.approx(0.1)
    assert get_lr(9, 1.0, 100, "constant", warmup=10) == 1.0
    assert get_lr(100, 1.0, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert max(get_lr(s, 1.0, 100, "onecycle") for s in range(100)) == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError):
        get_lr(0, 1.0, 10, "bogus")


def test_sampler_resumes_where_it_stopped_and_ranks_share_out_each_epoch():
    whole = list(itertools.islice(iter(InfiniteShardSampler(10, seed=3)), 35))
    resumed = list(itertools.islice(iter(InfiniteShardSampler(10, seed=3, start=17)), 18))
    assert whole[17:] == resumed
    assert sorted(whole[:10]) == list(range(10)) and whole[:10] != whole[10:20]
    ranks = [list(itertools.islice(iter(InfiniteShardSampler(10, seed=3, rank=r, world_size=2)), 5)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))


def test_ema_warm_up_follows_the_model_early_and_averages_later():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 0)  # decay min(0.999, 1/10) = 0.1: mostly the new weights
    assert ema.model.weight.item() == pytest.approx(0.1 * 0.5 + 0.9 * 1.0)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model, 10 ** 6)  # decay 0.999
    assert ema.model.weight.item() == pytest.approx(0.999 * 0.95 + 0.001 * 2.0)


def test_state_dict_prefixes_are_removed():
    sd = {"module._orig_mod.a": 1, "module.b": 2, "c": 3}
    assert clean_state_dict(sd) == {"a": 1, "b": 2, "c": 3}


@pytest.mark.parametrize("text,value", [("True", True), ("false", False), ("1", True), ("no", False)])
def test_booleans_parse(text, value):
    assert str2bool(text) is value


def test_non_booleans_are_refused():
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")
