"""Bad input gets an error that says what was wrong and how to fix it."""
import pytest
import torch
from torch import nn

import dropflat

from families import make_case


def test_empty_loader():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="no samples"):
        dropflat.HessianOperator(model, []).matvec(torch.zeros(8))
    with pytest.raises(ValueError, match="no samples"):
        dropflat.lanczos(model, [(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))], k=1)


def test_no_loader_for_model():
    with pytest.raises(ValueError, match="loader"):
        dropflat.lanczos(nn.Linear(3, 2), k=1)


def test_no_trainable_parameters():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        dropflat.HessianOperator(model, [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))])


def test_unknown_parameter_names():
    with pytest.raises(ValueError, match="not parameters of the model"):
        dropflat.HessianOperator(nn.Linear(3, 2), [], params=["weight", "nope"])


def test_non_scalar_loss():
    model, loader = make_case("mlp-relu", 0)
    loss = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(ValueError, match="scalar.*batch 0.*reduction='mean'"):
        dropflat.HessianOperator(model, loader, loss).matvec(torch.zeros(99, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_names_the_batch(bad):
    model, loader = make_case("mlp-relu", 0)
    loader[2] = (torch.full_like(loader[2][0], bad), loader[2][1])
    with pytest.raises(FloatingPointError, match="batch 2"):
        dropflat.lanczos(model, loader, k=2)


def test_k_not_less_than_P():
    A = torch.eye(5, dtype=torch.float64)
    for k in (5, 6, 0):
        with pytest.raises(ValueError, match="k must satisfy"):
            dropflat.lanczos(A, k=k)


def test_wrong_vector_length():
    model, loader = make_case("mlp-relu", 0)
    H = dropflat.HessianOperator(model, loader)
    with pytest.raises(ValueError, match=r"length 10 .* length 99"):
        H.matvec(torch.zeros(10))
    with pytest.raises(ValueError, match=r"length 100"):
        H @ torch.zeros(100, 3)
    with pytest.raises(ValueError, match="dimension"):
        H.matvec(torch.zeros(99, 1))


def test_bad_modes_and_options():
    model, loader = make_case("mlp-relu", 0)
    with pytest.raises(ValueError, match="dropout must be one of"):
        dropflat.HessianOperator(model, loader, dropout="sometimes")
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        dropflat.HessianOperator(model, loader, batchnorm="frozen")
    with pytest.raises(ValueError, match="which must be one of"):
        dropflat.lanczos(model, loader, k=2, which="middle")
    with pytest.raises(ValueError, match="method must be one of"):
        dropflat.hessian_trace(model, loader, method="exact")
    with pytest.raises(TypeError, match="only apply when a model is passed"):
        dropflat.lanczos(torch.eye(4), [], k=1)
    with pytest.raises(ValueError, match="a batch must be an \\(inputs, targets\\) pair"):
        dropflat.HessianOperator(model, [torch.zeros(3, 5)]).matvec(torch.zeros(99))
