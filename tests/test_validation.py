"""The argument checks shared by the layers (gblr._validation): good values come back
normalised, bad ones raise a ValueError whose message names the argument."""

import re

import pytest
import torch

from gblr._validation import (
    check_finite_number,
    check_flops_ratio,
    check_input,
    check_input_dtype,
    check_matrix,
    check_positive_int,
    check_share,
    check_sigma,
    layer_name,
)

NAN, INF = float("nan"), float("inf")


# -- numbers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 7, 2**40])
def test_check_positive_int_returns_the_int(value):
    result = check_positive_int("rank", value)
    assert result == value and type(result) is int


@pytest.mark.parametrize("value", [0, -3, True, False, 2.0, 0.5, NAN, INF, "4", None])
def test_check_positive_int_rejects(value):
    with pytest.raises(ValueError, match=rf"^rank must be a positive int, got {value!r}$"):
        check_positive_int("rank", value)


@pytest.mark.parametrize("value, expected", [(0.25, 0.25), (1, 1.0), (1.0, 1.0), (1e-9, 1e-9)])
def test_check_flops_ratio_returns_a_float(value, expected):
    result = check_flops_ratio(value)
    assert result == expected and type(result) is float


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.0000001, 2, NAN, INF, -INF, True, "0.5", None])
def test_check_flops_ratio_rejects(value):
    with pytest.raises(ValueError, match=r"^flops_ratio must be a number in \(0, 1\], got "):
        check_flops_ratio(value)


def test_check_flops_ratio_names_the_given_argument():
    with pytest.raises(ValueError, match=r"^flops_target must be a number in \(0, 1\], got 0$"):
        check_flops_ratio(0, name="flops_target")
    assert check_flops_ratio(0.5, "flops_target") == 0.5


@pytest.mark.parametrize("value, expected", [(0, 0.0), (0.0, 0.0), (0.3, 0.3), (1, 1.0)])
def test_check_share_returns_a_float_and_admits_both_ends(value, expected):
    result = check_share(value, "dense_share")
    assert result == expected and type(result) is float


@pytest.mark.parametrize("value", [-0.1, 1.5, NAN, INF, -INF, True, False, "0.5", None])
def test_check_share_rejects(value):
    with pytest.raises(ValueError, match=r"^dense_share must be a number in \[0, 1\], got "):
        check_share(value, "dense_share")


@pytest.mark.parametrize("value, expected", [(None, None), (0.5, 0.5), (2, 2.0), (1e-6, 1e-6)])
def test_check_sigma_returns_none_or_a_float(value, expected):
    result = check_sigma(value)
    assert result == expected
    assert result is None if value is None else type(result) is float


@pytest.mark.parametrize("value", [0, 0.0, -1.0, NAN, INF, True, "1", [1.0]])
def test_check_sigma_rejects(value):
    with pytest.raises(ValueError, match=r"^sigma must be None \(sharp boxcars\) or a positive finite number, got "):
        check_sigma(value)


# -- tensors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 5), (0, 5)])
def test_check_input_accepts_any_leading_dims(shape):
    assert check_input(torch.zeros(shape), 5) is None


@pytest.mark.parametrize(
    "x, shape",
    [(torch.zeros(2, 4), "(2, 4)"), (torch.zeros(5, 2), "(5, 2)"), (torch.tensor(1.0), "()")],
)
def test_check_input_rejects_a_wrong_last_dimension(x, shape):
    message = rf"^input must have in_features=5 in its last dimension, got shape {re.escape(shape)}$"
    with pytest.raises(ValueError, match=message):
        check_input(x, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_check_matrix_returns_the_tensor_detached(dtype):
    value = torch.randn(3, 4, dtype=torch.float64).to(dtype).requires_grad_()
    result = check_matrix("weight", value)
    assert not result.requires_grad and result.dtype == dtype
    assert result.data_ptr() == value.data_ptr()  # the same storage, not a copy
    assert torch.equal(result, value.detach())


@pytest.mark.parametrize(
    "value, message",
    [
        ([[1.0, 2.0]], r"^weight must be a 2-D floating point tensor, got list$"),
        (None, r"^weight must be a 2-D floating point tensor, got NoneType$"),
        (torch.zeros(4), r"^weight must be a 2-D floating point tensor, got \(4,\)$"),
        (torch.zeros(2, 3, 4), r"^weight must be a 2-D floating point tensor, got \(2, 3, 4\)$"),
        (torch.zeros(2, 3, dtype=torch.long), r"^weight must be a 2-D floating point tensor, got \(2, 3\)$"),
        (torch.zeros(2, 3, dtype=torch.bool), r"^weight must be a 2-D floating point tensor, got \(2, 3\)$"),
        (torch.zeros(0, 3), r"^weight must not be empty, got shape \(0, 3\)$"),
        (torch.tensor([[1.0, NAN]]), r"^weight contains NaN or infinite values$"),
        (torch.tensor([[1.0], [-INF]]), r"^weight contains NaN or infinite values$"),
    ],
)
def test_check_matrix_rejects(value, message):
    with pytest.raises(ValueError, match=message):
        check_matrix("weight", value)


def test_messages_name_the_argument_they_were_given():
    for check in (lambda name: check_positive_int(name, 0), lambda name: check_share(2, name),
                  lambda name: check_flops_ratio(2, name), lambda name: check_matrix(name, torch.zeros(3))):
        with pytest.raises(ValueError, match=r"^my_arg "):
            check("my_arg")


def test_check_input_refuses_what_is_not_a_tensor():
    with pytest.raises(TypeError, match=r"^input must be a torch.Tensor, got list$"):
        check_input([0.0] * 5, 5)


def test_check_input_dtype_refuses_integers_and_other_dtypes_outside_autocast():
    assert check_input_dtype(torch.zeros(2, 3), torch.float32, "L") is None
    with pytest.raises(ValueError, match=r"^input must be a floating point tensor of dtype torch.float32 \(the dtype "
                                         r"of L\), got torch.int32"):
        check_input_dtype(torch.zeros(2, 3, dtype=torch.int32), torch.float32, "L")
    with pytest.raises(ValueError, match=r"^input has dtype torch.float16 but L has dtype torch.float32"):
        check_input_dtype(torch.zeros(2, 3, dtype=torch.float16), torch.float32, "L")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert check_input_dtype(torch.zeros(2, 3, dtype=torch.float16), torch.float32, "L") is None


@pytest.mark.parametrize("value", [NAN, INF, -INF, -1.0, True, "1", None])
def test_check_finite_number_rejects(value):
    with pytest.raises(ValueError, match=rf"^lr must be a finite number >= 0, got {re.escape(repr(value))}$"):
        check_finite_number("lr", value)


def test_check_finite_number_bounds():
    assert check_finite_number("lr", 0.0) == 0.0 and check_finite_number("lr", 3) == 3
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got 0$"):
        check_finite_number("lr", 0, allow_minimum=False)


def test_layer_name_names_class_and_shape():
    assert layer_name(torch.nn.Linear(3, 2)) == "Linear(in_features=3, out_features=2)"
