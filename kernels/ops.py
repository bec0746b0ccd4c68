"""The ``qcompile::`` custom ops.

Every op is a ``torch.library.custom_op`` with a fake (meta) implementation, so it
survives torch.export, ``.pt2`` save/load and torch.compile. The default
implementation is the plain-PyTorch reference in ``qcompile.kernels.reference``; CUDA
kernels register on top of it per device.

Notation: x [..., K] activation, weight packed [N, ...], y [..., N] in x.dtype.
"""

import torch

from qcompile.kernels import reference

Tensor = torch.Tensor


def _check_linear(
    name: str, x: Tensor, weight: Tensor, weight_scale: Tensor, packed_k: int, n_scales: int
) -> None:
    torch._check(
        weight.dim() == 2 and weight.shape[1] == packed_k,
        lambda: (
            f"qcompile.{name}: weight {tuple(weight.shape)} does not fit x [..., "
            f"{x.shape[-1]}] (expected [N, {packed_k}])"
        ),
    )
    torch._check(
        weight_scale.numel() in (1, n_scales),
        lambda: (
            f"qcompile.{name}: weight_scale {tuple(weight_scale.shape)} does not fit "
            f"weight {tuple(weight.shape)}"
        ),
    )


def _empty_output(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("qcompile::linear_int8_wo", mutates_args=())
def linear_int8_wo(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """y = x · (q · s)ᵀ + b; q int8 [N, K], s float32 [N]."""
    return reference.linear_int8_wo(x, weight, weight_scale, bias)


@linear_int8_wo.register_fake
def _(x, weight, weight_scale, bias):
    _check_linear("linear_int8_wo", x, weight, weight_scale, x.shape[-1], weight.shape[0])
    return _empty_output(x, weight)


@torch.library.custom_op("qcompile::linear_fp8_wo", mutates_args=())
def linear_fp8_wo(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """y = x · (f · s)ᵀ + b; f float8_e4m3fn [N, K], s float32 [N]."""
    return reference.linear_fp8_wo(x, weight, weight_scale, bias)


@linear_fp8_wo.register_fake
def _(x, weight, weight_scale, bias):
    _check_linear("linear_fp8_wo", x, weight, weight_scale, x.shape[-1], weight.shape[0])
    return _empty_output(x, weight)


@torch.library.custom_op("qcompile::linear_int4_wo", mutates_args=())
def linear_int4_wo(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, group_size: int
) -> Tensor:
    """y = x · (q · s)ᵀ + b; q int4 packed uint8 [N, Kp/2], s float32 [N, Kp/G]."""
    return reference.linear_int4_wo(x, weight, weight_scale, bias, group_size)


@linear_int4_wo.register_fake
def _(x, weight, weight_scale, bias, group_size):
    groups = -(-x.shape[-1] // group_size)
    _check_linear(
        "linear_int4_wo",
        x,
        weight,
        weight_scale,
        groups * group_size // 2,
        weight.shape[0] * groups,
    )
    return _empty_output(x, weight)


# ---------------------------------------------------------------- activations, W8A8


@torch.library.custom_op("qcompile::quantize_act_static", mutates_args=())
def quantize_act_static(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """x / scale rounded to `dtype` (int8 or float8_e4m3fn); scale is a float32 scalar."""
    return reference.quantize_act_static(x, scale, dtype)


@quantize_act_static.register_fake
def _(x, scale, dtype):
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("qcompile::quantize_act_dynamic", mutates_args=())
def quantize_act_dynamic(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-row scale = max|x[row]| / qmax; returns (q in `dtype`, scale float32 [..., 1])."""
    return reference.quantize_act_dynamic(x, dtype)


@quantize_act_dynamic.register_fake
def _(x, dtype):
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _w8a8_fake(x_q, x_scale, weight, weight_scale, bias, out_dtype):
    _check_linear("linear_w8a8", x_q, weight, weight_scale, x_q.shape[-1], weight.shape[0])
    return x_q.new_empty((*x_q.shape[:-1], weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("qcompile::linear_int8_w8a8", mutates_args=())
def linear_int8_w8a8(
    x_q: Tensor,
    x_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """y = (x_q · qᵀ) · x_scale · w_scale + b, int8 × int8 with exact accumulation."""
    return reference.linear_w8a8(x_q, x_scale, weight, weight_scale, bias, out_dtype)


linear_int8_w8a8.register_fake(_w8a8_fake)


@torch.library.custom_op("qcompile::linear_fp8_w8a8", mutates_args=())
def linear_fp8_w8a8(
    x_q: Tensor,
    x_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """y = (x_q · fᵀ) · x_scale · w_scale + b, e4m3 × e4m3 accumulated in float32."""
    return reference.linear_w8a8(x_q, x_scale, weight, weight_scale, bias, out_dtype)


linear_fp8_w8a8.register_fake(_w8a8_fake)


# ---------------------------------------------------------------- 4-bit, SVDQuant


def _w4_fake(x, weight, weight_scale, weight_global_scale, bias, lora_down, lora_up, fmt, g):
    torch._check(fmt in reference.w4.FORMATS, lambda: f"qcompile: unknown 4-bit format {fmt!r}")
    groups = -(-x.shape[-1] // g)
    _check_linear(
        f"{fmt} linear", x, weight, weight_scale, groups * g // 2, weight.shape[0] * groups
    )
    _check_branch(x, weight, lora_down, lora_up)
    return _empty_output(x, weight)


def _check_branch(x: Tensor, weight: Tensor, lora_down: Tensor | None, lora_up: Tensor | None):
    """The low-rank branch's shapes: down [R, K], up [N, R]."""
    if lora_down is not None:
        torch._check(
            lora_up is not None
            and lora_down.shape[1] == x.shape[-1]
            and lora_up.shape == (weight.shape[0], lora_down.shape[0]),
            lambda: (
                f"qcompile: low-rank branch {tuple(lora_down.shape)} / "
                f"{None if lora_up is None else tuple(lora_up.shape)} does not fit "
                f"x [..., {x.shape[-1]}] and N={weight.shape[0]}"
            ),
        )


def _check_smooth(x: Tensor, smooth: Tensor | None):
    if smooth is not None:
        torch._check(
            smooth.shape == (x.shape[-1],),
            lambda: f"qcompile: smooth {tuple(smooth.shape)} does not fit x [..., {x.shape[-1]}]",
        )


@torch.library.custom_op("qcompile::linear_w4a16", mutates_args=())
def linear_w4a16(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    weight_global_scale: Tensor | None,
    bias: Tensor | None,
    lora_down: Tensor | None,
    lora_up: Tensor | None,
    fmt: str,
    group_size: int,
) -> Tensor:
    """y = x · Q(W)ᵀ + (x · downᵀ) · upᵀ + b; 4-bit weight (int4/mxfp4/nvfp4), 16-bit x."""
    return reference.w4.linear_w4a16(
        x, weight, weight_scale, weight_global_scale, bias, lora_down, lora_up, fmt, group_size
    )


@linear_w4a16.register_fake
def _(x, weight, weight_scale, weight_global_scale, bias, lora_down, lora_up, fmt, group_size):
    return _w4_fake(
        x, weight, weight_scale, weight_global_scale, bias, lora_down, lora_up, fmt, group_size
    )


@torch.library.custom_op("qcompile::linear_w4a4", mutates_args=())
def linear_w4a4(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    weight_global_scale: Tensor | None,
    bias: Tensor | None,
    smooth: Tensor | None,
    lora_down: Tensor | None,
    lora_up: Tensor | None,
    fmt: str,
    group_size: int,
) -> Tensor:
    """SVDQuant in one op: x_s = x / smooth; y = Q(x_s) · Q(R)ᵀ + (x_s · downᵀ) · upᵀ + b."""
    return reference.w4.linear_w4a4(
        x,
        weight,
        weight_scale,
        weight_global_scale,
        bias,
        smooth,
        lora_down,
        lora_up,
        fmt,
        group_size,
    )


@linear_w4a4.register_fake
def _(
    x, weight, weight_scale, weight_global_scale, bias, smooth, lora_down, lora_up, fmt, group_size
):
    _check_smooth(x, smooth)
    return _w4_fake(
        x, weight, weight_scale, weight_global_scale, bias, lora_down, lora_up, fmt, group_size
    )


@torch.library.custom_op("qcompile::smooth", mutates_args=())
def smooth(x: Tensor, factors: Tensor) -> Tensor:
    """x / factors (per input channel, float32 math) in x.dtype.

    Appears only between the `smooth` pass and lowering, which folds it into the
    4-bit linear that reads it.
    """
    return (x.to(torch.float32) / factors.to(torch.float32)).to(x.dtype)


@smooth.register_fake
def _(x, factors):
    return torch.empty_like(x)


# ---------------------------------------------------------------- W4A8


@torch.library.custom_op("qcompile::linear_w4a8", mutates_args=())
def linear_w4a8(
    x: Tensor,
    weight: Tensor,
    weight_group_scale: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    smooth: Tensor | None,
    lora_down: Tensor | None,
    lora_up: Tensor | None,
    input_scale: Tensor | None,
    group_size: int,
) -> Tensor:
    """x_s = x / smooth; y = Q8(x_s) · (g·q)ᵀ · a · s + (x_s · downᵀ) · upᵀ + b: 4-bit
    weights with integer group scales g (uint8 [N, Kp/G]) and float32 channel scales s
    [N], int8 activations (per row, or the static `input_scale`); ``reference.w4a8``."""
    return reference.w4a8.linear_w4a8(
        x, weight, weight_group_scale, weight_scale, bias, smooth, lora_down, lora_up, input_scale
    )


@linear_w4a8.register_fake
def _(
    x, weight, weight_group_scale, weight_scale, bias, smooth, lora_down, lora_up, input_scale,
    group_size,
):  # fmt: skip
    groups = -(-x.shape[-1] // group_size)
    _check_linear(
        "linear_w4a8", x, weight, weight_group_scale, groups * group_size // 2,
        weight.shape[0] * groups,
    )  # fmt: skip
    torch._check(
        weight_scale.numel() == weight.shape[0],
        lambda: (
            f"qcompile.linear_w4a8: weight_scale {tuple(weight_scale.shape)} needs one "
            f"scale per output channel ({weight.shape[0]})"
        ),
    )
    torch._check(
        input_scale is None or input_scale.numel() == 1,
        lambda: "qcompile.linear_w4a8: input_scale must be one float32 scalar (static)",
    )
    _check_smooth(x, smooth)
    _check_branch(x, weight, lora_down, lora_up)
    return _empty_output(x, weight)
