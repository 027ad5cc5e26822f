"""The memorization audit's similarity: copies are found however they are shifted, rescaled or noised, different
heads are not, and the threshold comes from the held-out volumes."""

from __future__ import annotations

import pytest
import torch

from bundle.audit import copy_threshold, head_standardised, nearest_cases
from bundle.errors import BadInputError


def _heads(count: int, seed: int) -> torch.Tensor:
    """(count, 2, 16, 16, 16) smooth random heads in [0, 1]: an ellipsoid of blurred noise on a background of 0."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 16)] * 3, indexing="ij"))
    inside = ((grid / torch.tensor([0.8, 0.9, 0.7])[:, None, None, None]).square().sum(0) < 1).float()
    texture = torch.rand(count, 2, 16, 16, 16, generator=generator)
    texture = torch.nn.functional.avg_pool3d(texture, 3, stride=1, padding=1, count_include_pad=False)
    return (0.3 + texture) * inside / 1.3


def test_head_standardised_volumes_have_unit_norm_and_ignore_brightness_and_contrast():
    heads = _heads(2, 0)
    standard = head_standardised(heads)
    assert torch.allclose(standard.flatten(1).norm(dim=1), torch.ones(2))
    inside = heads.mean(1, keepdim=True) > 0.1
    brighter = torch.where(inside, heads * 0.5 + 0.3, heads)  # another scanner's gain and offset, in the head only
    assert torch.allclose(head_standardised(brighter), standard, atol=1e-5)


def test_a_noisy_copy_shifted_by_a_voxel_is_nearest_its_original_and_above_every_other_head():
    training, others = _heads(6, 1), _heads(4, 2)
    copy = torch.roll(training[3:4], (1, -1, 0), dims=(2, 3, 4))
    copy = (copy + 0.01 * torch.randn(copy.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    similarity, index = nearest_cases(torch.cat([copy, others]), training, max_shift=1, chunk=4)
    assert index[0] == 3 and similarity[0] > 0.9
    assert similarity[1:].max() < similarity[0] - 0.2
    unshifted, _ = nearest_cases(copy, training, max_shift=0)
    assert unshifted[0] < similarity[0]  # the shift is what the search over shifts undoes


def test_the_threshold_is_the_nearest_new_patient_and_copies_pass_it():
    training, held_out = _heads(6, 4), _heads(3, 5)
    held_similarity, _ = nearest_cases(held_out, training)
    threshold = copy_threshold(held_similarity)
    assert threshold == pytest.approx(float(held_similarity.max()))
    copies, _ = nearest_cases(training[:2] * 0.9, training)
    assert (copies > threshold).all() and (held_similarity <= threshold).all()
    with pytest.raises(BadInputError, match="at least one held-out case"):
        copy_threshold(torch.zeros(0))


def test_volumes_of_another_grid_are_refused_by_name():
    with pytest.raises(BadInputError, match=r"share channels and grid: got queries \(2, 8, 8, 8\)"):
        nearest_cases(torch.rand(1, 2, 8, 8, 8), torch.rand(3, 2, 16, 16, 16))
