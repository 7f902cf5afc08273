"""Fused compensated logit-adjusted cross-entropy with FIT (Sage, Eq. 22 to 24): Triton kernel.

One kernel serves both losses. Per row i with label y (rows whose label is `ignore_index` add
nothing), for each stream t in {z, zv, zt, z^} with z^ = z + s1 zv + s2 zt:

    a_t = t + log_prior                       (fp32, whatever the logits' dtype)
    l_t = logsumexp(a_t) - a_t[y]
    p_t = softmax(a_t)

    loss_i = l_z + lam1 l_zv + lam2 l_zt + lam3 l_z^
    dz     = (p_z  - 1_y) + lam3    (p_z^ - 1_y)
    dzv    = lam1 (p_zv - 1_y) + lam3 s1 (p_z^ - 1_y)
    dzt    = lam2 (p_zt - 1_y) + lam3 s2 (p_z^ - 1_y)
    ds1_i  = lam3 sum_c (p_z^ - 1_y)_c zv_c          ds2_i likewise with zt

Gradients are already divided by the number of non-ignored rows (the mean of the loss), so
backward only multiplies them by grad_output. The plain compensated LA loss is this kernel with
FIT=False: only the z stream is read and lam1 = lam2 = lam3 = 0.

Each program owns BLOCK_B rows and walks the classes in BLOCK_C chunks twice: pass 1 keeps an
online max / sum-of-exp per stream (so C is unbounded and nothing of size C stays on chip),
pass 2 recomputes the softmax from the final log-sum-exp and writes the gradients. All math is
fp32 after an explicit upcast: fp16/bf16 arithmetic would lose the loss' precision (and bf16 is
wrong under the Triton interpreter).

The kernel also validates its input on the fly, at no extra pass over memory: per row it writes
a status word (STATUS_NONFINITE: a NaN/Inf among z, zv, zt or their adjusted logits; STATUS_BAD_LABEL: a label outside
[0, C) that is not ignore_index; STATUS_NONFINITE_ZHAT: z^ overflowed or s1/s2 is not finite).
The host raises on a non-zero status.
"""
import triton
import triton.language as tl

from . import utils  # noqa: F401  (decides interpret mode before the kernels below are decorated)

# constexpr so the kernel may read them; the host reads `.value`.
STATUS_NONFINITE = tl.constexpr(1)
STATUS_BAD_LABEL = tl.constexpr(2)
STATUS_NONFINITE_ZHAT = tl.constexpr(4)


@triton.jit
def _online_lse(a, m, d):
    """Fold chunk a (BLOCK_B, BLOCK_C; masked columns = -inf) into running max m and sum d."""
    m_new = tl.maximum(m, tl.max(a, axis=1))
    d = d * tl.exp(m - m_new) + tl.sum(tl.exp(a - m_new[:, None]), axis=1)
    return m_new, d


@triton.jit
def _count_nonfinite(x):
    return tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1)


@triton.jit
def fit_la_loss_fwd_kernel(
    z_ptr, zv_ptr, zt_ptr,  # (B, C) logits, unit column stride, any float dtype
    stride_z, stride_zv, stride_zt,  # row strides in elements
    target_ptr,  # (B,) int64
    log_prior_ptr,  # (C,) fp32
    s_ptr,  # (2,) fp32: s1, s2 (read only when FIT)
    n_valid_ptr,  # (1,) int64: number of rows whose label is not ignore_index
    loss_ptr,  # (B,) fp32 out: weighted per-row loss (0 for ignored rows), not divided by n_valid
    ds_ptr,  # (B, 2) fp32 out: per-row d loss / d (s1, s2), divided by n_valid (FIT only)
    status_ptr,  # (B,) int32 out: STATUS_* bits
    dz_ptr, dzv_ptr, dzt_ptr,  # (B, C) contiguous out, each in its logits' dtype (when NEED_*)
    zhat_ptr,  # (B, C) contiguous out in z's dtype (when WRITE_ZHAT)
    B, C, ignore_index,
    lam1, lam2, lam3,
    FIT: tl.constexpr,
    NEED_DZ: tl.constexpr,
    NEED_DZV: tl.constexpr,
    NEED_DZT: tl.constexpr,
    WRITE_ZHAT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_in = rows < B
    rows64 = rows.to(tl.int64)  # B * C can pass 2^31 (512 x 8142 x 4 streams does not, larger batches do)
    y = tl.load(target_ptr + rows, mask=row_in, other=ignore_index)
    active = row_in & (y != ignore_index)
    bad_label = active & ((y < 0) | (y >= C))
    # n_valid == 0: every row is inactive and its gradients are 0 whatever inv_n is.
    inv_n = 1.0 / tl.maximum(tl.load(n_valid_ptr).to(tl.float32), 1.0)

    z_row = z_ptr + rows64[:, None] * stride_z
    zv_row = zv_ptr + rows64[:, None] * stride_zv
    zt_row = zt_ptr + rows64[:, None] * stride_zt
    out_row = rows64[:, None] * C

    if FIT:
        s1 = tl.load(s_ptr)
        s2 = tl.load(s_ptr + 1)

    neg_inf = float("-inf")
    m_z = tl.full([BLOCK_B], neg_inf, tl.float32)
    d_z = tl.zeros([BLOCK_B], tl.float32)
    y_z = tl.zeros([BLOCK_B], tl.float32)
    m_v = tl.full([BLOCK_B], neg_inf, tl.float32)
    d_v = tl.zeros([BLOCK_B], tl.float32)
    y_v = tl.zeros([BLOCK_B], tl.float32)
    m_t = tl.full([BLOCK_B], neg_inf, tl.float32)
    d_t = tl.zeros([BLOCK_B], tl.float32)
    y_t = tl.zeros([BLOCK_B], tl.float32)
    m_h = tl.full([BLOCK_B], neg_inf, tl.float32)
    d_h = tl.zeros([BLOCK_B], tl.float32)
    y_h = tl.zeros([BLOCK_B], tl.float32)
    n_bad = tl.zeros([BLOCK_B], tl.int32)
    n_bad_h = tl.zeros([BLOCK_B], tl.int32)

    # Pass 1: online log-sum-exp of every stream, the label's adjusted logit, finiteness.
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_in = cols < C
        mask = row_in[:, None] & col_in[None, :]
        is_y = cols[None, :] == y[:, None]
        # Columns past C get log_prior = -inf: they vanish from every exp and sum, while the
        # logits there load 0 so that products with them (ds) stay 0, not NaN. Rows past B load 0
        # (finite), so their running max never becomes -inf - -inf = NaN.
        lp = tl.load(log_prior_ptr + cols, mask=col_in, other=neg_inf)[None, :]
        xz = tl.load(z_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        az = xz + lp
        # Counted on the adjusted logits, so a bad log_prior is caught as well.
        n_bad += _count_nonfinite(tl.where(col_in[None, :], az, 0.0))
        m_z, d_z = _online_lse(az, m_z, d_z)
        y_z += tl.sum(tl.where(is_y, az, 0.0), axis=1)
        if FIT:
            xv = tl.load(zv_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xt = tl.load(zt_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xh = xz + s1 * xv + s2 * xt
            av = xv + lp
            at = xt + lp
            ah = xh + lp
            n_bad += _count_nonfinite(tl.where(col_in[None, :], av, 0.0))
            n_bad += _count_nonfinite(tl.where(col_in[None, :], at, 0.0))
            n_bad_h += _count_nonfinite(tl.where(col_in[None, :], ah, 0.0))
            m_v, d_v = _online_lse(av, m_v, d_v)
            m_t, d_t = _online_lse(at, m_t, d_t)
            m_h, d_h = _online_lse(ah, m_h, d_h)
            y_v += tl.sum(tl.where(is_y, av, 0.0), axis=1)
            y_t += tl.sum(tl.where(is_y, at, 0.0), axis=1)
            y_h += tl.sum(tl.where(is_y, ah, 0.0), axis=1)

    # logsumexp = m + log d, but kept apart: a - m is exact for the large entries, and adding
    # log d (small) only then keeps p and the loss accurate at |logits| ~ 1e4, where one fp32 ulp
    # of m + log d would already be ~1e-3.
    ld_z = tl.log(d_z)
    row_loss = (m_z - y_z) + ld_z
    if FIT:
        ld_v = tl.log(d_v)
        ld_t = tl.log(d_t)
        ld_h = tl.log(d_h)
        row_loss += lam1 * ((m_v - y_v) + ld_v) + lam2 * ((m_t - y_t) + ld_t) + lam3 * ((m_h - y_h) + ld_h)
    tl.store(loss_ptr + rows, tl.where(active, row_loss, 0.0), mask=row_in)
    status = tl.where(n_bad > 0, STATUS_NONFINITE, 0) + tl.where(bad_label, STATUS_BAD_LABEL, 0)
    status += tl.where(n_bad_h > 0, STATUS_NONFINITE_ZHAT, 0)
    tl.store(status_ptr + rows, status, mask=row_in)

    # Pass 2: gradients (and z^), from the final log-sum-exp; the chunks are re-read from L2/HBM.
    if NEED_DZ or NEED_DZV or NEED_DZT or WRITE_ZHAT:
        ds1 = tl.zeros([BLOCK_B], tl.float32)
        ds2 = tl.zeros([BLOCK_B], tl.float32)
        keep = active[:, None]
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_in = cols < C
            mask = row_in[:, None] & col_in[None, :]
            onehot = (cols[None, :] == y[:, None]).to(tl.float32)
            lp = tl.load(log_prior_ptr + cols, mask=col_in, other=neg_inf)[None, :]
            xz = tl.load(z_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g_z = tl.exp((xz + lp - m_z[:, None]) - ld_z[:, None]) - onehot
            if FIT:
                xv = tl.load(zv_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                xt = tl.load(zt_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                xh = xz + s1 * xv + s2 * xt
                if WRITE_ZHAT:
                    tl.store(zhat_ptr + out_row + cols[None, :], xh.to(zhat_ptr.dtype.element_ty), mask=mask)
                g_h = lam3 * (tl.exp((xh + lp - m_h[:, None]) - ld_h[:, None]) - onehot)
                if NEED_DZ:
                    dz = tl.where(keep, (g_z + g_h) * inv_n, 0.0)
                    tl.store(dz_ptr + out_row + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
                if NEED_DZV:
                    g_v = lam1 * (tl.exp((xv + lp - m_v[:, None]) - ld_v[:, None]) - onehot)
                    dzv = tl.where(keep, (g_v + s1 * g_h) * inv_n, 0.0)
                    tl.store(dzv_ptr + out_row + cols[None, :], dzv.to(dzv_ptr.dtype.element_ty), mask=mask)
                if NEED_DZT:
                    g_t = lam2 * (tl.exp((xt + lp - m_t[:, None]) - ld_t[:, None]) - onehot)
                    dzt = tl.where(keep, (g_t + s2 * g_h) * inv_n, 0.0)
                    tl.store(dzt_ptr + out_row + cols[None, :], dzt.to(dzt_ptr.dtype.element_ty), mask=mask)
                # Masked columns: g_h = 0 and xv = xt = 0, so they add nothing to the s1 / s2 sums.
                ds1 += tl.sum(g_h * xv, axis=1)
                ds2 += tl.sum(g_h * xt, axis=1)
            else:
                if NEED_DZ:
                    dz = tl.where(keep, g_z * inv_n, 0.0)
                    tl.store(dz_ptr + out_row + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if FIT:
            tl.store(ds_ptr + rows64 * 2, tl.where(active, ds1 * inv_n, 0.0), mask=row_in)
            tl.store(ds_ptr + rows64 * 2 + 1, tl.where(active, ds2 * inv_n, 0.0), mask=row_in)
