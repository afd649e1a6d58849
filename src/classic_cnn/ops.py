"""The math of a classic CNN as pure forward/backward pairs on NumPy arrays.

Every function here is a pure function of its arguments. A forward function returns
``(output, cache)``; its backward partner takes the gradient of the loss with respect to that
output and the cache, and returns the gradients with respect to the inputs and parameters.
This is the only module that plays speed tricks; ``reference.py`` holds plain loop versions
that slide the kernel exactly as a textbook describes, and the tests hold these to them.

Layout is channels-last throughout: images and feature maps are ``N×H×W×C``, convolution
kernels are ``KH×KW×C_in×C_out``, dense weights ``in×out``.

Output size of a sliding window (convolution or pooling) along one axis::

    H' = 1 + (H + pad_top + pad_bottom - KH) // stride
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import math
import os
import sys
import threading

import numpy as np

from . import _blas
from ._blas import matmul as _mm

Pads = tuple[tuple[int, int], tuple[int, int]]


# --------------------------------------------------------------------------------------------
# Shapes and padding
# --------------------------------------------------------------------------------------------


def output_size(size: int, kernel: int, stride: int, pad_lo: int = 0, pad_hi: int = 0) -> int:
    """Number of window positions along one axis: ``1 + (size + pad_lo + pad_hi - kernel) //
    stride``."""
    return 1 + (size + pad_lo + pad_hi - kernel) // stride


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras's 'same' padding along one axis: the output has ``ceil(size / stride)`` positions.

    The total padding is what that output size needs; when it is odd the extra row or column
    goes at the end (bottom or right).
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def resolve_padding(
    padding: str | int | tuple, in_hw: tuple[int, int], kernel: tuple[int, int], stride: int
) -> Pads:
    """Turn a padding spec into explicit ``((top, bottom), (left, right))`` amounts.

    ``padding`` is ``"valid"`` (none), ``"same"`` (Keras's), an int (the same on every side)
    or explicit amounts ``((top, bottom), (left, right))``.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            return (
                same_padding(in_hw[0], kernel[0], stride),
                same_padding(in_hw[1], kernel[1], stride),
            )
        raise ValueError(
            f"padding must be 'valid', 'same' or an int. Received: padding={padding!r}"
        )
    if isinstance(padding, (int, np.integer)):
        p = int(padding)
        return (p, p), (p, p)
    (pt, pb), (pl, pr) = padding
    return (int(pt), int(pb)), (int(pl), int(pr))


# --------------------------------------------------------------------------------------------
# Compiled loops
# --------------------------------------------------------------------------------------------


def _k():
    """The compiled loops of ``_kernels.py`` (numba), imported on first use only: ``cnn --help``
    and ``import classic_cnn`` stay fast, and numba is loaded only by code that computes."""
    global _KERNELS
    if _KERNELS is None:
        from . import _kernels

        _KERNELS = _kernels
    return _KERNELS


_KERNELS = None


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------
#
# Inside :func:`engine_threads` (which ``Sequential.forward`` and ``backward`` enter), the big
# operations split their batch over threads of their own: images for convolution and pooling,
# pieces of images for the im2col products, rows for the elementwise passes. The matrix
# library (BLAS) is held to one thread meanwhile: its idle threads spin-wait for the next
# product, and on two cores one spinning thread halves the speed of any other work (measured:
# TinyVGG's direct 3×3 convolution on two threads took 9.6 ms alone, 16.7 ms right after a
# two-thread matrix product). Every split is fixed by the shapes and the thread count, and
# every sum over a batch is made of per-image, per-piece or per-block parts added in order:
# results never depend on which thread finishes first, so a thread count gives the same bits
# run after run (the direct convolution's and batch norm's sums do not depend on it at all).

_LOCAL = threading.local()
_LOCK = threading.Lock()
_ACTIVE = {"count": 0, "restore": []}
_POOL: list = [[], 0]  # one single-thread executor per worker, the process they belong to
_BLAS = None

#: an operation runs on one thread unless its estimated one-thread time, in nanoseconds, is at
#: least this. Handing work to the other thread and getting it back costs 60-90 µs on the
#: 2-core virtual machines this is measured on (waking an idle virtual CPU, the GIL passed back
#: and forth; 13 µs at best): at 2 threads, LeNet-5's dense layers at batch 64 (10-80 µs of
#: work) took 2.5-7× longer split than whole, its first pooling (0.18 ms) 1.2-1.5× longer.
PARALLEL_MIN_NS = 250_000
#: one-thread costs behind that estimate, in ns, measured on the Xeon of the README's table:
#: an elementwise pass per number (read, compute, write), a multiply-add in a BLAS product and
#: in the direct convolution's loops, a number gathered into im2col patches, a pooling tap
NS_PER_NUMBER = 0.5
NS_PER_MAC_BLAS = 0.025
NS_PER_MAC_DIRECT = 0.065
NS_PER_GATHERED = 0.15
NS_PER_POOL_TAP = 0.15


def threads() -> int:
    """Threads the operations of this thread may use now: 1 outside :func:`engine_threads`."""
    return getattr(_LOCAL, "threads", None) or 1


def _blas_libraries():
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
    return _BLAS


#: glibc's malloc serves every array above 128 KB with fresh pages from the kernel (mmap) and
#: returns them on free, and it hands free memory at the top of its heap back too: the arrays
#: of a training step (a few MB each, allocated and freed every step) then page-fault on every
#: step. The engine asks it, once, to serve arrays up to 32 MB from its heap and to keep up to
#: 1 GiB of freed heap for the next step. Measured (LeNet-5, batch 64, one thread): the first
#: pooling's backward pass 0.43 → 0.19 ms, a whole step about 10% faster. The process keeps its
#: peak heap instead of returning it between steps. ``CLASSIC_CNN_MALLOC=system`` (or glibc's
#: own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``) leaves malloc as it is.
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 1 << 30
_MALLOC = {"tuned": None}


def tune_malloc() -> bool:
    """Apply :data:`MALLOC_MMAP_THRESHOLD` and :data:`MALLOC_TRIM_THRESHOLD` to glibc's
    malloc (once per process; nothing elsewhere, or when the environment opts out). Returns
    whether they are in force."""
    if _MALLOC["tuned"] is not None:
        return _MALLOC["tuned"]
    _MALLOC["tuned"] = False
    env = os.environ
    if (
        not sys.platform.startswith("linux")
        or env.get("CLASSIC_CNN_MALLOC", "").strip().lower() == "system"
        or "MALLOC_MMAP_THRESHOLD_" in env
        or "MALLOC_TRIM_THRESHOLD_" in env
    ):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        # glibc only: other C libraries' mallopt options differ
        glibc = hasattr(libc, "gnu_get_libc_version")
    except (OSError, AttributeError):
        return False
    if not glibc:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    ok = mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD) == 1
    ok = mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD) == 1 and ok
    _MALLOC["tuned"] = ok
    return ok


@contextlib.contextmanager
def engine_threads(n: int | None = None):
    """Let the operations called inside split their work over ``n`` threads (default: as many
    as the matrix library, BLAS, may use now: ``threadpoolctl.threadpool_limits`` and
    ``cnn --threads`` set it), BLAS held to one thread meanwhile and restored after.

    Nested or concurrent uses share one setting; BLAS is restored when the last one ends.
    """
    if getattr(_LOCAL, "threads", None) is not None:  # nested: the outer setting holds
        yield
        return
    libs = _blas_libraries()
    with _LOCK:
        if _MALLOC["tuned"] is None:
            tune_malloc()
        if _ACTIVE["count"] == 0:
            _ACTIVE["restore"] = [(lib, lib.num_threads) for lib in libs]
            _ACTIVE["available"] = max([t for _, t in _ACTIVE["restore"]] + [1])
            for lib, t in _ACTIVE["restore"]:
                if t != 1:
                    lib.set_num_threads(1)
        _ACTIVE["count"] += 1
        available = _ACTIVE["available"]
    _LOCAL.threads = max(1, int(n)) if n else available
    try:
        yield
    finally:
        _LOCAL.threads = None
        with _LOCK:
            _ACTIVE["count"] -= 1
            if _ACTIVE["count"] == 0:
                for lib, t in _ACTIVE["restore"]:
                    if t != 1:
                        lib.set_num_threads(t)


#: checks of a flag a thread makes, spinning without the GIL, before it waits on an Event
#: instead: 0.6 ms (the worker) to 2.6 ms (the caller) on a Xeon (a step's operations follow closer)
HANDOFF_SPINS = 2_000_000


class _Handoff:
    """The second thread of two-way splits, handed its part without sleeping in between.

    A ``ThreadPoolExecutor`` handoff makes the worker wake from a wait, then the caller wake
    from its wait on the future: on 2-core virtual machines each wake-up takes 50-100 µs, and
    a 227 µs compiled loop split in two took 253 µs (``benchmarks/bench_handoff.py``). Here
    the caller waits for the worker's part by spinning on a flag in compiled code, without
    the GIL, which the worker needs at that moment to finish its part's Python; and the
    worker, its part done, says so and waits for the next one in the same compiled call,
    without the GIL, which the caller needs at that moment. After :data:`HANDOFF_SPINS`
    checks either side waits on an Event instead (the worker marks itself asleep, and the
    caller that sees the mark sets the Event). Waits have timeouts and look at the flags
    again, so no lost wake-up can stall a split for good. One caller at a time: another
    thread that finds it busy uses the executor."""

    def __init__(self):
        self.ctl = np.zeros(8, dtype=np.int64)
        self.lock = threading.Lock()
        self.task_event, self.done_event = threading.Event(), threading.Event()
        self.work, self.error, self.task = None, None, 0
        self.thread = threading.Thread(target=self._serve, name="classic-cnn-handoff", daemon=True)
        self.thread.start()

    def _serve(self):
        kern, ctl, seen = _k(), self.ctl, 0
        task = kern.handoff_next(ctl, seen, HANDOFF_SPINS, False)
        while True:
            if task < 0:  # the process is exiting: out of compiled code before it is torn down
                return
            if task == 0:  # asleep until a caller sets the Event (or a timeout: look again)
                self.task_event.wait(0.05)
                self.task_event.clear()
                task = kern.handoff_next(ctl, seen, 1, False)
                continue
            seen = task
            try:
                self.work(1)
            except BaseException as e:  # handed to the caller
                self.error = e
            self.done_event.set()
            task = kern.handoff_next(ctl, seen, HANDOFF_SPINS, True)

    def run(self, work) -> None:
        """``work(0)`` here, ``work(1)`` on the worker; the caller holds :attr:`lock`."""
        kern, ctl = _k(), self.ctl
        self.work, self.error = work, None
        self.done_event.clear()
        self.task += 1
        task = self.task
        if kern.handoff_post(ctl, task):
            self.task_event.set()
        try:
            work(0)
        finally:
            # spinning without the GIL, which the worker needs to finish its part's Python
            while not kern.handoff_wait_done(ctl, task, HANDOFF_SPINS):
                if not self.thread.is_alive():
                    raise RuntimeError("classic-cnn's handoff thread is gone")
                self.done_event.wait(0.05)
            self.work = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def stop(self) -> None:
        """Let the worker leave its compiled wait and end (at exit: it is not left running
        compiled code while the interpreter and the compiled code are torn down)."""
        _k().handoff_post(self.ctl, -1)
        self.task_event.set()
        self.thread.join(timeout=1.0)


_HANDOFF: list = [None, 0]  # the process's _Handoff and the process it belongs to


@atexit.register
def _stop_handoff() -> None:
    h, pid = _HANDOFF
    if h is not None and pid == os.getpid():
        h.stop()


def _handoff() -> _Handoff | None:
    """The process's :class:`_Handoff`, made on first use (again in a forked child, or
    after it was stopped), locked for the caller; None when another thread holds it."""
    with _LOCK:
        h, pid = _HANDOFF
        if h is None or pid != os.getpid() or not h.thread.is_alive():
            h = _Handoff()
            _HANDOFF[:] = [h, os.getpid()]
    return h if h.lock.acquire(blocking=False) else None


def _run(work, parts: int) -> None:
    """``work(t)`` for t in 0..parts-1: part 0 on the calling thread, part t on worker t, the
    same thread each time (so its workspaces still hold what it left there, see
    :func:`_patches_into`); with two parts through :class:`_Handoff` where it is free."""
    if parts <= 1:
        work(0)
        return
    if parts == 2:
        h = _handoff()
        if h is not None:
            try:
                h.run(work)
            finally:
                h.lock.release()
            return
    with _LOCK:
        workers, pid = _POOL
        # new workers in a forked child (its copy of the pool has no threads); more when needed
        if pid != os.getpid():
            workers = []
            _POOL[:] = [workers, os.getpid()]
        while len(workers) < parts - 1:
            from concurrent.futures import ThreadPoolExecutor

            workers.append(ThreadPoolExecutor(1, thread_name_prefix="classic-cnn"))
    futures = [workers[t - 1].submit(work, t) for t in range(1, parts)]
    try:
        work(0)
    finally:
        for f in futures:
            f.result()


def _parts(n: int, size: float, ns_per_unit: float = NS_PER_NUMBER) -> int:
    """How many threads to split ``n`` items over, ``size`` units of work in all, each taking
    about ``ns_per_unit`` on one thread (see :data:`PARALLEL_MIN_NS`)."""
    t = threads()
    return 1 if t <= 1 or n < 2 or size * ns_per_unit < PARALLEL_MIN_NS else min(t, n)


def _ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering 0..n, as even as possible."""
    bounds = [n * p // parts for p in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def _split(n: int, size: float, body, ns_per_unit: float = NS_PER_NUMBER) -> None:
    """``body(start, end)`` over contiguous ranges of 0..n, on threads when worth it."""
    parts = _parts(n, size, ns_per_unit)
    ranges = _ranges(n, parts)
    _run(lambda t: body(*ranges[t]), parts)


def split_whole(n: int, size: float, body, ns_per_unit: float = NS_PER_NUMBER) -> None:
    """``body(start, end)`` over contiguous ranges of 0..n as :func:`_split` deals them out,
    every operation inside a range on that range's thread alone (:func:`threads` is 1
    there): for work that goes through many operations, a whole network's forward pass at
    inference, which then changes hands once instead of once per operation."""
    parts = _parts(n, size, ns_per_unit)
    ranges = _ranges(n, parts)

    def work(t):
        outer = getattr(_LOCAL, "threads", None)
        _LOCAL.threads = 1  # engine_threads inside is nested: it keeps this
        try:
            body(*ranges[t])
        finally:
            _LOCAL.threads = outer

    _run(work, parts)


# --------------------------------------------------------------------------------------------
# im2col / col2im
# --------------------------------------------------------------------------------------------


def im2col(x: np.ndarray, kh: int, kw: int, stride: int, pads: Pads) -> np.ndarray:
    """Gather every receptive-field patch of ``x`` into one row of a matrix.

    Parameters
    ----------
    x : (N, H, W, C) array
    kh, kw : kernel height and width
    stride : step between window positions, in both directions
    pads : ``((top, bottom), (left, right))`` zero padding

    Returns
    -------
    cols : (N, H', W', KH, KW, C) array, C-contiguous, so that
        ``cols.reshape(N*H'*W', KH*KW*C)`` is free and matches ``w.reshape(KH*KW*C, C_out)``.
    """
    n, h, w, c = x.shape
    oh = output_size(h, kh, stride, *pads[0])
    ow = output_size(w, kw, stride, *pads[1])
    cols = np.empty((n, oh, ow, kh, kw, c), dtype=x.dtype)
    _im2col_into(
        np.ascontiguousarray(x), kh, kw, stride, pads, oh, ow, cols.reshape(n * oh * ow, -1)
    )
    return cols


def _im2col_into(x, kh, kw, stride, pads, oh, ow, cols2d):
    # one compiled pass: per (image, position, kernel row) one contiguous run of KW·C numbers;
    # the padding is never materialised (positions outside x read as 0)
    _k().im2col(x, kh, kw, stride, pads[0][0], pads[1][0], oh, ow, cols2d)


def col2im(dcols: np.ndarray, x_shape, kh: int, kw: int, stride: int, pads: Pads) -> np.ndarray:
    """The adjoint of :func:`im2col`: patch gradients ``dcols`` (N·H'·W', KH·KW·C) added back to
    the input positions they were read from (overlapping patches add up). Returns (N, H, W, C).
    """
    n, h, w, c = x_shape
    (pt, pb), (pl, pr) = pads
    oh = output_size(h, kh, stride, pt, pb)
    ow = output_size(w, kw, stride, pl, pr)
    dx = np.zeros((n, h, w, c), dtype=dcols.dtype)
    _k().col2im(np.ascontiguousarray(dcols), kh, kw, stride, pt, pl, oh, ow, dx)
    return dx


#: bytes of patches the im2col path gathers at a time. The convolution runs on pieces of a few
#: images whose patches fit in the CPU's caches, in one buffer reused from piece to piece,
#: instead of gathering the whole batch's patches at once (115 MB for the fashion preset's
#: second conv at batch 128: fresh pages, and every product reading from main memory).
#: Measured on that conv (batch 128, 28×28×32 → 32, 2 threads): forward 38 → 15 ms, weight
#: gradient 28 → 18 ms (the patches gathered again, piece by piece, instead of kept). Since
#: the pieces run in one compiled call per thread, pieces of 1 MB (which fit in a core's L2
#: cache next to the other operands: 2 MB on the Xeon, 0.5-1 MB on AMD EPYC) beat 4 MB ones
#: (Xeon AVX-512, interleaved medians): LeNet-5 prediction of 1,000 images 1.07x on 1 thread,
#: 1.46x on 2; training at batch 64 / 256 1.09x / 1.09x on 1 thread, 0.94x / 1.11x on 2; the
#: article's network 1.08-1.10x on 1 thread, 1.13-1.38x on 2.
IM2COL_PIECE_BYTES = 1 << 20


def _piece_images(n: int, positions: int, patch: int, dtype, cout: int = 1) -> int:
    """Images per piece of the im2col path: at most as many as :data:`IM2COL_PIECE_BYTES` of
    patches hold, at least one, and the pieces as even as possible, their number a multiple of
    the threads (when the batch is worth splitting at all) so that each thread gets the same
    share (LeNet-5's second conv at batch 256 on 2 threads: pieces of 64, not 109, 109, 38)."""
    per_image = positions * patch * np.dtype(dtype).itemsize
    step = max(1, min(n, IM2COL_PIECE_BYTES // max(per_image, 1)))
    t = _parts(n, n * positions * patch, _im2col_ns(cout))
    pieces = math.ceil(math.ceil(n / step) / t) * t
    return math.ceil(n / min(pieces, n))


def _im2col_ns(cout: int, products: int = 1) -> float:
    """One-thread ns per number of the im2col path's patches: gathered once, multiplied with
    ``cout`` kernels in each of ``products`` products."""
    return NS_PER_GATHERED + products * cout * NS_PER_MAC_BLAS


_WORK = threading.local()


def _workspace(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A scratch array of ``shape``, reused by later calls on the same thread (its contents are
    whatever the last user left)."""
    bufs = getattr(_WORK, "bufs", None)
    if bufs is None:
        bufs = _WORK.bufs = {}
    size = math.prod(shape)
    key = (name, np.dtype(dtype).str)
    buf = bufs.get(key)
    if buf is None or buf.size < size:
        buf = bufs[key] = np.empty(max(size, 1), dtype=dtype)
        _held().pop(key, None)
    return buf[:size].reshape(shape)


def _held() -> dict:
    """What this thread's workspaces hold, by workspace: see :func:`_patches_into`."""
    held = getattr(_WORK, "held", None)
    if held is None:
        held = _WORK.held = {}
    return held


def _patches_into(x, s, e, kh, kw, stride, pads, oh, ow, piece, gather: bool = True) -> None:
    """The patches of images ``s:e`` of x into ``piece``, the start of this thread's "cols"
    workspace, which then records that it holds them. With ``gather=False`` (the backward
    pass), nothing is done when it still holds exactly those patches: the forward pass's last
    piece on this thread, when no other convolution has used the workspace since (the
    backward pass takes each thread's pieces in reverse order, so that piece comes first).
    The cache keeps x alive from forward to backward, so its ``id`` cannot be reused."""
    tag = _tag(x, s, e, kh, kw, stride, pads, oh, ow, piece.shape)
    if gather or _held().get(("cols", x.dtype.str)) != tag:
        _im2col_into(x[s:e], kh, kw, stride, pads, oh, ow, piece)
        _hold(x, s, e, kh, kw, stride, pads, oh, ow, piece)


def _hold(x, s, e, kh, kw, stride, pads, oh, ow, piece) -> None:
    """Record that this thread's "cols" workspace now holds the patches of images s..e of x
    (see :func:`_patches_into`)."""
    _held()[("cols", x.dtype.str)] = _tag(x, s, e, kh, kw, stride, pads, oh, ow, piece.shape)


def _tag(x, s, e, kh, kw, stride, pads, oh, ow, shape) -> tuple:
    """What identifies the patches of images s..e of x in a workspace of ``shape``."""
    return (id(x), s, e, kh, kw, stride, pads, oh, ow, tuple(shape))


def _window_slices(kh: int, kw: int, stride: int, oh: int, ow: int):
    """Yield ``(i, j, rows, cols)``: for each offset inside a window, the strided slices of the
    input that this offset touches across all ``oh × ow`` window positions."""
    for i in range(kh):
        rows = slice(i, i + stride * (oh - 1) + 1, stride)
        for j in range(kw):
            yield i, j, rows, slice(j, j + stride * (ow - 1) + 1, stride)


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------

#: below this many numbers per patch (KH·KW·C_in), a stride-1 convolution is computed directly
#: (the compiled "wide row" loops of ``_kernels.py``); above it, as im2col × kernels by BLAS
#: (a 3×3 kernel: on the Winograd path, see :data:`WINOGRAD`). Measured on LeNet-5, TinyVGG
#: and the article's network: direct wins 1.1–2.5× for the first layers (27–75 numbers per
#: patch) and TinyVGG's second conv (90), loses 2× on LeNet's second conv (150), where the
#: matrix product is efficient.
DIRECT_MAX_PATCH = 128


def _direct(w: np.ndarray, stride: int) -> bool:
    kh, kw, cin, _ = w.shape
    return stride == 1 and kh * kw * cin < DIRECT_MAX_PATCH


def conv2d_forward(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    stride: int = 1,
    padding="valid",
    relu: bool = False,
    moments=None,
) -> tuple[np.ndarray, tuple]:
    """Convolution (cross-correlation, as every CNN library computes it).

    Each output number is the sum over one receptive field of kernel × input, plus the bias:
    ``y[n, i, j, k] = b[k] + Σ_{di, dj, c} x_pad[n, i*s + di, j*s + dj, c] · w[di, dj, c, k]``.
    All of them at once: the patches as rows of a matrix (im2col) times the kernels as columns;
    or, for small patches at stride 1, directly by compiled loops (see :data:`DIRECT_MAX_PATCH`);
    or, for the other stride-1 3×3 convolutions, by Winograd's minimal filtering F(2×2, 3×3)
    (see :data:`WINOGRAD`; there a NaN or infinity in the input spreads over the 2×2 output
    blocks whose 4×4 inputs hold it, a few more outputs than its 3×3 neighbourhood).

    Parameters
    ----------
    x : (N, H, W, C_in) input
    w : (KH, KW, C_in, C_out) kernels
    b : (C_out,) biases, or None
    stride : int
    padding : 'valid', 'same', int, or ((top, bottom), (left, right))
    relu : also apply the ReLU that follows, in the same pass (``Sequential`` fuses the pair;
        :func:`conv2d_backward` then takes the gradient through both, bit for bit what the
        two layers give one after the other)
    moments : None, or two (N, C_out) float64 arrays filled, on the thread that writes each
        image of y right after it, with the image's per-channel ``(sums, m2)``
        (:func:`image_moments`): the statistics of the batch norm that follows, taken while
        the output is in the cache (``Sequential`` passes them on to it)

    Returns
    -------
    y : (N, H', W', C_out) with ``H' = 1 + (H + pad_top + pad_bottom - KH) // stride``
    cache : what :func:`conv2d_backward` needs
    """
    n, h, wd = x.shape[:3]
    kh, kw = w.shape[:2]
    pads = resolve_padding(padding, (h, wd), (kh, kw), stride)
    oh = output_size(h, kh, stride, *pads[0])
    ow = output_size(wd, kw, stride, *pads[1])
    x = np.ascontiguousarray(x)
    if _direct(w, stride):
        y, cache, body, ns = _direct_forward(x, w, b, pads, oh, ow, relu)
        if moments is not None:
            conv, ns = body, ns + y.size * NS_PER_NUMBER

            def body(s, e):
                conv(s, e)
                image_moments(y, s, e, *moments)

        _split(n, ns, body, 1.0)
        return y, cache
    make_after = None
    if moments is not None:
        make_after = lambda y: lambda s, e, _: image_moments(y, s, e, *moments)  # noqa: E731
    if _winograd(w, stride):
        return _winograd_forward(x, w, b, pads, oh, ow, relu, moments=moments)
    return _im2col_forward(x, w, b, stride, pads, oh, ow, relu, make_after)


def _im2col_forward(x, w, b, stride, pads, oh, ow, relu, make_after=None, keep=True, pool=None):
    """The im2col path of :func:`conv2d_forward`. ``make_after(y)``, given the output
    (N, H', W', C_out) before it is computed, returns ``after(s, e, piece)``, run on the same
    thread right after images s..e are written, ``piece`` holding them (the batch norm's
    statistics, in the cache). ``pool``: ``(ph, pw, stride, pooled, arg)``, the max pooling
    that follows, done the same way into pooled and arg. ``keep=False`` (inference): each
    piece's output goes to a scratch array of the thread, not into an output kept (y is then
    None, and so is the cache).

    Where oneMKL computes the products (float32), each thread's pieces run in one compiled
    call, pooling included (``_kernels.im2col_conv_pieces``: the same steps, off the GIL)."""
    n, cin = x.shape[0], x.shape[3]
    kh, kw, _, cout = w.shape
    # im2col × kernels, a few images at a time (see IM2COL_PIECE_BYTES); the pieces are dealt
    # out to the threads in turn, each with its own patch buffer
    patch, per = kh * kw * cin, oh * ow
    wmat = np.ascontiguousarray(w).reshape(patch, cout)
    y = np.empty((n * per, cout), dtype=x.dtype) if keep else None
    after = make_after(y.reshape(n, oh, ow, cout) if keep else None) if make_after else None
    step = _piece_images(n, per, patch, x.dtype, cout)
    starts = range(0, n, step)
    parts = _parts(len(starts), n * per * patch, _im2col_ns(cout))
    relu, kern = bool(relu), _k()
    gemm = _blas.gemm_address(x.dtype) if after is None else None
    ph, pw, pool_stride, pooled, arg = pool if pool is not None else (0, 0, 1, None, None)

    def pool_piece(src, s, e):
        if (ph, pw) == (2, 2):
            kern.maxpool2x2_forward(src, pool_stride, pooled[s:e], arg[s:e])
        else:
            kern.maxpool2d_forward(src, ph, pw, pool_stride, pooled[s:e], arg[s:e])

    def work(t):
        cols = _workspace("cols", (step * per, patch), x.dtype)
        scratch = None if keep else _workspace("conv_out", (step * per, cout), x.dtype)
        mine = starts[t::parts]
        if gemm is not None and len(mine):
            bias = b if b is not None else wmat[0]  # (unread without a bias)
            out = y if keep else scratch
            nothing = (np.empty((0,) * 4, x.dtype), np.empty((0,) * 4, np.uint8))
            pool_out = (pooled, arg) if pool is not None else nothing
            kern.im2col_conv_pieces(
                gemm,
                x,
                np.asarray(mine, dtype=np.int64),
                step,
                kh,
                kw,
                stride,
                pads[0][0],
                pads[1][0],
                oh,
                ow,
                wmat,
                bias,
                b is not None,
                relu,
                cols,
                out,
                keep,
                ph,
                pw,
                pool_stride,
                *pool_out,
            )
            s = mine[-1]
            _hold(
                x,
                s,
                min(n, s + step),
                kh,
                kw,
                stride,
                pads,
                oh,
                ow,
                cols[: (min(n, s + step) - s) * per],
            )
            return
        for s in mine:
            e = min(n, s + step)
            piece = cols[: (e - s) * per]
            _patches_into(x, s, e, kh, kw, stride, pads, oh, ow, piece)
            out = y[s * per : e * per] if keep else scratch[: (e - s) * per]
            _mm(piece, wmat, out)
            if b is not None:  # bias and ReLU in one pass, while the piece is in the caches
                kern.bias_relu(out, b, relu)
            elif relu:
                np.maximum(out, 0, out=out)
            if after is not None:
                after(s, e, out.reshape(e - s, oh, ow, cout))
            if pool is not None:
                pool_piece(out.reshape(e - s, oh, ow, cout), s, e)

    _run(work, parts)
    if not keep:
        return None, None
    y = y.reshape(n, oh, ow, cout)
    return y, (x, w, b is not None, stride, pads, "im2col", y if relu else None)


#: stride-1 3×3 convolutions too wide for the direct path run as Winograd F(2×2, 3×3) (see
#: ``_kernels.py``), forward and backward: 16 products per 2×2 block of outputs and channel
#: pair instead of 36, so 2.25× fewer multiply-adds than im2col, and no patches gathered (the
#: transformed blocks hold 16/4 = 4 numbers per input number, im2col's patches 9). The same
#: sums in another order: results differ from im2col's in the last bits only (held to the
#: reference like every path). Measured on the fashion preset's three such convolutions
#: (batch 256, 1 thread, Xeon AVX-512): forward 1.5-2.1x, backward 1.2-1.8x faster than
#: im2col; its whole training step 1.2x faster at batch 64 and 256 (2 threads).
WINOGRAD = True
#: bytes of one piece's transformed inputs in the Winograd path (the products then run on
#: matrices of a few hundred tiles, in the caches)
WINOGRAD_PIECE_BYTES = 1 << 20


def _winograd(w: np.ndarray, stride: int) -> bool:
    return WINOGRAD and stride == 1 and w.shape[:2] == (3, 3) and not _direct(w, stride)


#: ``G ⊗ G`` (16×9): row 4i + j, column 3p + q holds G[i, p]·G[j, q], with
#: G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]; every entry (0, ±¼, ±½, 1) is exact
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_GG = np.kron(_G, _G)


def _winograd_kernels(w: np.ndarray) -> np.ndarray:
    """``G g Gᵀ`` for every kernel g (3×3) of w (3, 3, C_in, C_out): (16, C_in, C_out), as one
    product (G ⊗ G)·w (a tenth of the time of two passes of NumPy operations: single images
    spent 40-90 µs per convolution there)."""
    u = np.empty((16, *w.shape[2:]), dtype=w.dtype)
    _mm(_GG.astype(w.dtype), np.ascontiguousarray(w).reshape(9, -1), u.reshape(16, -1))
    return u


def _winograd_plan(x_shape, w, oh, ow, dtype):
    """``(tiles per image rows, columns, images per piece, piece starts, threads)``."""
    n, cin, cout = x_shape[0], w.shape[2], w.shape[3]
    th, tw = (oh + 1) // 2, (ow + 1) // 2
    per_image = 16 * th * tw * max(cin, cout) * np.dtype(dtype).itemsize
    step = max(1, min(n, WINOGRAD_PIECE_BYTES // max(per_image, 1)))
    size = n * oh * ow * 9 * cin
    # the pieces as even as possible, but the same whatever the thread count: a tile's
    # product is then the same call, of the same size, on 1 thread or 3, and so are its bits
    # (oneMKL's AVX2 path gives a row other last bits in a product of another size)
    step = math.ceil(n / math.ceil(n / step))
    starts = range(0, n, step)
    return th, tw, step, starts, _parts(len(starts), size, _im2col_ns(cout) / 2)


def _winograd_forward(
    x, w, b, pads, oh, ow, relu, make_after=None, keep=True, pool=None, moments=None
):
    """The Winograd path of :func:`conv2d_forward` (stride 1, 3×3 kernels), piece by piece as
    the im2col path: per piece the inputs' transform V, the 16 products V·U, the outputs'
    transform (with bias and ReLU); ``make_after``, ``keep`` and ``pool`` as in
    :func:`_im2col_forward`; ``moments``: the batch norm's statistics arrays, filled per
    piece (:func:`image_moments`). Where oneMKL computes the products, each thread's pieces
    run in one compiled call (``_kernels.winograd_conv_pieces``, 16 oneMKL products per piece
    instead of one stacked NumPy product: as fast, measured, and off the GIL)."""
    n, cin, cout = x.shape[0], x.shape[3], w.shape[3]
    th, tw, step, starts, parts = _winograd_plan(x.shape, w, oh, ow, x.dtype)
    u = _winograd_kernels(w)
    bias = np.zeros(cout, dtype=x.dtype) if b is None else np.ascontiguousarray(b, x.dtype)
    y = np.empty((n, oh, ow, cout), dtype=x.dtype) if keep else None
    after = make_after(y) if make_after else None
    kern, relu, (pt, pl) = _k(), bool(relu), (pads[0][0], pads[1][0])
    gemm = _blas.gemm_address(x.dtype) if after is None else None
    ph, pw, pool_stride, pooled, arg = pool if pool is not None else (0, 0, 1, None, None)

    def work(t):
        v = _workspace("wino_v", (16, step * th * tw, cin), x.dtype)
        m = _workspace("wino_m", (16, step * th * tw, cout), x.dtype)
        xp = _workspace("wino_xp", (2 * th + 2, 2, tw + 1, cin), x.dtype)
        scratch = None if keep else _workspace("conv_out", (step, oh, ow, cout), x.dtype)
        mine = starts[t::parts]
        if gemm is not None:
            if len(mine):
                nothing = (np.empty((0,) * 4, x.dtype), _NO_ARG)
                pool_out = (pooled, arg) if pool is not None else nothing
                stats = moments if moments is not None else (np.empty((0, 0)),) * 2
                kern.winograd_conv_pieces(
                    gemm,
                    x,
                    np.asarray(mine, np.int64),
                    step,
                    pt,
                    pl,
                    th,
                    tw,
                    u,
                    bias,
                    relu,
                    v,
                    m,
                    xp,
                    y if keep else scratch,
                    keep,
                    ph,
                    pw,
                    pool_stride,
                    *pool_out,
                    moments is not None,
                    *stats,
                )
            return
        for s in mine:
            e = min(n, s + step)
            tiles = (e - s) * th * tw
            kern.winograd_input(x, s, e, pt, pl, th, tw, v, xp)
            np.matmul(v[:, :tiles], u, out=m[:, :tiles])
            if keep:
                kern.winograd_output(m, s, e, th, tw, bias, relu, y)
                out = y[s:e]
            else:  # the piece's images at the start of the scratch array
                out = scratch[: e - s]
                kern.winograd_output(m, 0, e - s, th, tw, bias, relu, out)
            if after is not None:
                after(s, e, out)
            if pool is not None:
                if (ph, pw) == (2, 2):
                    kern.maxpool2x2_forward(out, pool_stride, pooled[s:e], arg[s:e])
                else:
                    kern.maxpool2d_forward(out, ph, pw, pool_stride, pooled[s:e], arg[s:e])
            if moments is not None:
                per = oh * ow
                kern.channel_block_moments(
                    out.reshape(-1, cout), per, moments[0][s:e], moments[1][s:e]
                )

    _run(work, parts)
    if not keep:
        return None, None
    return y, (x, w, b is not None, 1, pads, "winograd", y if relu else None)


def _winograd_weight_grad(du: np.ndarray) -> np.ndarray:
    """The adjoint of :func:`_winograd_kernels`: ``Gᵀ dU G`` for dU (16, C_in, C_out), as the
    product (G ⊗ G)ᵀ·dU."""
    dw = np.empty((3, 3, *du.shape[1:]), dtype=du.dtype)
    _mm(_GG.T.astype(du.dtype), np.ascontiguousarray(du).reshape(16, -1), dw.reshape(9, -1))
    return dw


def _winograd_backward(dy, cache, input_grad, fill=None, after=None, route=None):
    """The Winograd path's :func:`conv2d_backward`, ``fill``, ``after`` and ``route`` as in
    :func:`_im2col_backward`; piece by piece, as the forward pass. Where oneMKL computes the
    products (float32), each thread's pieces run in one compiled call
    (``_kernels.winograd_conv_backward_pieces``), the pooling's routing and the batch norm's
    gradient sums (an ``after`` of :func:`batchnorm_grad_sums_taker`) inside.

    The kernels' gradient in the transformed space: with V = Bᵀ d B (computed again) and the
    output gradient's transform dM = A dY Aᵀ, ``dU = Vᵀ·dM`` (16 products per piece, summed
    as said below), then ``dw = Gᵀ dU G``. The input gradient of
    a stride-1 3×3 convolution is itself one: of dy padded by 2 − p where the forward pass
    padded p, with the kernels turned by 180° and their input and output channels swapped
    (``dx[i, j, c] = Σ dy[i + pt − di, j + pl − dj, k]·w[di, dj, c, k]``); it runs on the
    forward loops. A side padded by more than 2: im2col's backward pass instead."""
    x, w, has_bias, _, pads, _, y = cache
    (pt, pb), (pl, pr) = pads
    pending = dy if isinstance(dy, PendingGradient) else None
    if max(pt, pb, pl, pr) > 2:
        dy = dy if pending is None else pending.materialize()
        return _im2col_backward(dy, cache, input_grad, fill, after, route)
    n, h, wd, cin = x.shape
    cout = w.shape[3]
    relu = y is not None
    oh, ow = pending.shape[1:3] if pending is not None else dy.shape[1:3]
    if pending is not None:  # the batch norm's dx, each piece computed as it is taken
        dy = np.empty(pending.shape, dtype=x.dtype)
        fill = lambda s, e: pending.fill(dy.reshape(-1, cout), s * oh * ow, e * oh * ow)  # noqa: E731
    th, tw, step, starts, parts = _winograd_plan(x.shape, w, oh, ow, x.dtype)
    hh, hw = (h + 1) // 2, (wd + 1) // 2  # the input gradient's tiles
    per = oh * ow
    dy2 = dy.reshape(-1, cout)
    dym = np.empty(dy2.shape, dtype=dy2.dtype) if relu else dy2
    dym4 = dym.reshape(dy.shape)
    u = _winograd_kernels(np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2)))
    zero_bias = np.zeros(cin, dtype=x.dtype)
    dx = np.empty(x.shape, dtype=x.dtype) if input_grad else None
    # one sum per thread, its pieces added in a fixed order, then the threads' sums in thread
    # order (the split is fixed by the shapes and the thread count): not one part per piece,
    # which at 256 channels and batch 256 would take 1 GB
    du_threads = np.zeros((parts, 16, cin, cout), dtype=x.dtype)
    db_parts = np.empty((len(starts), cout), dtype=x.dtype)
    ones = np.ones(step * per, dtype=x.dtype)
    kern = _k()
    yf = y.reshape(-1) if relu else None
    native = getattr(after, "native", None)
    ready = fill is None or route is not None or pending is not None
    compiled = (after is None or native is not None) and ready
    gemm = _blas.gemm_address(x.dtype) if compiled else None

    def compiled_loop(t, v, m, xp, gp, du_piece, v2, m2, xp2):
        dp, arg, ph, pw, pool_stride = route if route is not None else (dy, _NO_ARG, 0, 0, 1)
        kind = 0 if route is None else 1 if (ph, pw, pool_stride) == (2, 2, 2) else 2
        none2, none1 = np.empty((0, 0), x.dtype), np.empty(0, x.dtype)  # placeholders
        if native is None:
            sums = (none2, none1, none1, none1, none1, False, np.empty((0, 0)), np.empty((0, 0)))
        else:
            sums = native
        if pending is None:
            bn_dx = (none2, none2, *(none1,) * 4, False, *(none1,) * 3)
        else:
            bn_dx = (pending.dy2, pending.x2, *pending.args)
        kern.winograd_conv_backward_pieces(
            gemm,
            x,
            dy,
            y if relu else dy,
            relu,
            dym4,
            np.asarray(list(reversed(range(t, len(starts), parts))), np.int64),
            np.asarray(starts, np.int64),
            step,
            pt,
            pl,
            th,
            tw,
            has_bias,
            ones,
            db_parts,
            v,
            m,
            xp,
            gp,
            du_piece,
            du_threads[t],
            input_grad,
            hh,
            hw,
            u,
            v2,
            m2,
            xp2,
            zero_bias,
            dx if input_grad else x,
            kind,
            dp,
            arg,
            ph,
            pw,
            pool_stride,
            native is not None,
            *sums,
            pending is not None,
            *bn_dx,
        )

    def work(t):
        v = _workspace("wino_v", (16, step * th * tw, cin), x.dtype)
        m = _workspace("wino_m", (16, step * th * tw, cout), x.dtype)
        xp = _workspace("wino_xp", (2 * th + 2, 2, tw + 1, cin), x.dtype)
        gp = _workspace("wino_gp", (2 * th, 2, tw, cout), x.dtype)
        du_piece = _workspace("wino_du", (16, cin, cout), x.dtype)
        if input_grad:
            v2 = _workspace("wino_v2", (16, step * hh * hw, cout), x.dtype)
            m2 = _workspace("wino_m2", (16, step * hh * hw, cin), x.dtype)
            xp2 = _workspace("wino_xp2", (2 * hh + 2, 2, hw + 1, cout), x.dtype)
        if gemm is not None:
            if not input_grad:
                v2, m2, xp2 = v, m, xp
            return compiled_loop(t, v, m, xp, gp, du_piece, v2, m2, xp2)
        for i in reversed(range(t, len(starts), parts)):
            s = starts[i]
            e = min(n, s + step)
            tiles = (e - s) * th * tw
            if fill is not None:
                fill(s, e)
            if relu:  # dy where the output was positive, 0 elsewhere
                lo, hi = s * per * cout, e * per * cout
                kern.relu_backward(dy2.reshape(-1)[lo:hi], yf[lo:hi], dym.reshape(-1)[lo:hi])
            if has_bias:  # a column sum as a product with ones (see _im2col_backward)
                np.matmul(ones[: (e - s) * per], dym[s * per : e * per], out=db_parts[i])
            kern.winograd_input(x, s, e, pt, pl, th, tw, v, xp)
            kern.winograd_output_grad(dym4, s, e, th, tw, m, gp)
            np.matmul(v[:, :tiles].transpose(0, 2, 1), m[:, :tiles], out=du_piece)
            du_threads[t] += du_piece
            if input_grad:
                tiles2 = (e - s) * hh * hw
                kern.winograd_input(dym4, s, e, 2 - pt, 2 - pl, hh, hw, v2, xp2)
                np.matmul(v2[:, :tiles2], u, out=m2[:, :tiles2])
                kern.winograd_output(m2, s, e, hh, hw, zero_bias, False, dx)
                if after is not None:
                    after(dx, s, e)

    _run(work, parts)
    db = db_parts.sum(axis=0) if has_bias else None
    return dx, _winograd_weight_grad(du_threads.sum(axis=0)), db


def _direct_forward(x, w, b, pads, oh, ow, relu, keep=True):
    """The direct path's output, cache, ``body(s, e, out)`` computing images s..e into out
    (by default images s..e of the output), and its estimated one-thread time in ns.
    ``keep=False``: no output is made (y and the cache are None), body must be given out."""
    n, kh, kw, cin, cout = x.shape[0], *w.shape
    y = np.empty((n, oh, ow, cout), dtype=x.dtype) if keep else None
    bias = b if b is not None else np.zeros(cout, dtype=x.dtype)
    (pt, pb), (pl, pr) = pads
    wc, kern, relu = np.ascontiguousarray(w), _k().conv2d_s1_forward, bool(relu)

    def body(s, e, out=None):
        kern(x[s:e], wc, bias, pt, pb, pl, pr, y[s:e] if out is None else out, 0, cout, relu)

    cache = (x, w, b is not None, 1, pads, None, y if relu else None) if keep else None
    return y, cache, body, n * oh * ow * cout * kh * kw * cin * NS_PER_MAC_DIRECT


def _direct_backward(dy, cache, input_grad, after=None):
    """The direct path's backward pass: ``(body(s, e), finish())`` where body computes the
    gradients of images s..e from ``dy[s:e]`` (read when body runs, so it may be filled just
    before), then runs ``after(dx, s, e)`` if given, and finish returns ``(dx, dw, db)``; and
    the estimated one-thread time in ns."""
    x, w, has_bias, _, pads, _, y = cache
    kh, kw, cin, cout = w.shape
    relu = y is not None
    n = x.shape[0]
    (pt, pb), (pl, pr) = pads
    dw_parts = np.empty((n, kh, kw, cin, cout), dtype=x.dtype)
    db_parts = np.empty((n, cout), dtype=x.dtype)
    dx = np.empty(x.shape, dtype=x.dtype) if input_grad else np.empty((0, 0, 0, 0), x.dtype)
    wc, kern = np.ascontiguousarray(w), _k().conv2d_s1_backward

    def body(s, e):
        dxs = dx[s:e] if input_grad else dx
        ys = y[s:e] if relu else dy[:0]
        kern(
            x[s:e],
            wc,
            dy[s:e],
            ys,
            relu,
            pt,
            pb,
            pl,
            pr,
            dw_parts[s:e],
            db_parts[s:e],
            dxs,
            input_grad,
        )
        if after is not None and input_grad:
            after(dx, s, e)

    def finish():  # per-image sums, added in image order (deterministic)
        db = db_parts.sum(axis=0) if has_bias else None
        return (dx if input_grad else None), dw_parts.sum(axis=0), db

    ns = dy.size * kh * kw * cin * (2 if input_grad else 1) * NS_PER_MAC_DIRECT
    return body, finish, ns


def conv2d_backward(
    dy: np.ndarray, cache: tuple, input_grad: bool = True, after=None
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Gradients of :func:`conv2d_forward`.

    Returns ``(dx, dw, db)`` with the shapes of ``x``, ``w`` and ``b``; ``db`` is None when the
    forward pass had no bias, ``dx`` is None when ``input_grad`` is False (a first layer needs
    none). ``dw = colsᵀ · dy``: each kernel weight collects input × output gradient over all
    positions. ``dx``: each output's gradient flows back through the kernel to every input of its
    patch, ``dx_pad[n, i*s + di, j*s + dj, :] += w[di, dj] · dy[n, i, j, :]``; overlapping patches
    add up (the adjoint of im2col, "col2im").

    ``after(dx, s, e)``, with ``input_grad``: run on the thread that finished images s..e of
    dx, right after (the gradient sums of the batch norm before, while dx is in the cache).
    """
    x, path = cache[0], cache[5]
    if isinstance(dy, PendingGradient):  # the batch norm's dx, computed piece by piece
        if path == "winograd":
            return _winograd_backward(dy, cache, input_grad, after=after)
        dy = dy.materialize()
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    if path is None:  # the direct path
        body, finish, ns = _direct_backward(dy, cache, input_grad, after)
        _split(len(x), ns, body, 1.0)
        return finish()
    return _PIECES_BACKWARD[path](dy, cache, input_grad, after=after)


def _im2col_backward(dy, cache, input_grad, fill=None, after=None, route=None):
    """The im2col path of :func:`conv2d_backward`. With ``fill``, dy is not filled yet:
    ``fill(s, e)`` fills images s..e of it, on the thread that then uses them; ``route``:
    ``(dp, arg, ph, pw, stride)`` of the max pooling whose gradient ``fill`` routes (what
    the compiled loop does instead); ``after(dx, s, e)`` runs right after images s..e of dx
    are complete.

    Where oneMKL computes the products (float32) and nothing is to run after a piece, each
    thread's pieces run in one compiled call (``_kernels.im2col_conv_backward_pieces``: the
    same steps, off the GIL, see ``_kernels.im2col_conv_pieces``)."""
    x, w, has_bias, stride, pads, _, y = cache
    kh, kw, cin, cout = w.shape
    relu = y is not None
    n = x.shape[0]
    pt, pl = pads[0][0], pads[1][0]
    # piece by piece, as the forward pass: the patches gathered again (cheaper than keeping
    # the whole batch's), each piece's dw and db kept apart and the parts added in piece order
    # (the same sums whatever the thread count), patch gradients added back into dx; the fused
    # ReLU's gradient taken piece by piece, into a buffer of its own
    oh, ow = dy.shape[1], dy.shape[2]
    patch, per = kh * kw * cin, oh * ow
    dy2 = dy.reshape(-1, cout)
    dym = np.empty(dy2.shape, dtype=dy2.dtype) if relu else dy2
    wmat = np.ascontiguousarray(w).reshape(patch, cout)
    wmat_t = wmat.T
    dx = np.zeros(x.shape, dtype=x.dtype) if input_grad else None
    step = _piece_images(n, per, patch, x.dtype, cout)  # the forward pass's pieces
    starts = range(0, n, step)
    dw_parts = np.empty((len(starts), patch, cout), dtype=x.dtype)
    db_parts = np.empty((len(starts), cout), dtype=x.dtype)
    ones = np.ones(step * per, dtype=x.dtype)
    parts = _parts(len(starts), n * per * patch, _im2col_ns(cout, 2 if input_grad else 1))
    kern = _k()
    col2im_kernel, mask = kern.col2im, kern.relu_backward
    yf = y.reshape(-1) if relu else None
    native = after is None and (fill is None or route is not None)
    gemm = _blas.gemm_address(x.dtype) if native else None

    def compiled(t, cols, dcols):
        mine = list(reversed(range(t, len(starts), parts)))  # the piece still held first
        s = starts[mine[0]]
        e = min(n, s + step)
        tag = _tag(x, s, e, kh, kw, stride, pads, oh, ow, ((e - s) * per, patch))
        held = _held().get(("cols", x.dtype.str)) == tag
        dp, arg, ph, pw, pool_stride = route if route is not None else (dy, _NO_ARG, 0, 0, 1)
        kind = 0 if route is None else 1 if (ph, pw, pool_stride) == (2, 2, 2) else 2
        kern.im2col_conv_backward_pieces(
            gemm,
            x,
            dy,
            y if relu else dy,
            relu,
            dym.reshape(dy.shape),
            np.asarray(mine, np.int64),
            np.asarray(starts, np.int64),
            step,
            held,
            kh,
            kw,
            stride,
            pt,
            pl,
            wmat,
            has_bias,
            ones,
            db_parts,
            dw_parts,
            cols,
            dcols if input_grad else cols,
            input_grad,
            dx if input_grad else x,
            kind,
            dp,
            arg,
            ph,
            pw,
            pool_stride,
        )
        s = starts[mine[-1]]
        _hold(
            x,
            s,
            min(n, s + step),
            kh,
            kw,
            stride,
            pads,
            oh,
            ow,
            cols[: (min(n, s + step) - s) * per],
        )

    def work(t):
        cols = _workspace("cols", (step * per, patch), x.dtype)
        dcols = _workspace("dcols", (step * per, patch), x.dtype) if input_grad else None
        if gemm is not None:
            return compiled(t, cols, dcols)
        for i in reversed(range(t, len(starts), parts)):  # the piece still held comes first
            s = starts[i]
            e = min(n, s + step)
            piece = cols[: (e - s) * per]
            if fill is not None:
                fill(s, e)
            if relu:  # dy where the output was positive, 0 elsewhere
                lo, hi = s * per * cout, e * per * cout
                mask(dy2.reshape(-1)[lo:hi], yf[lo:hi], dym.reshape(-1)[lo:hi])
            dy_piece = dym[s * per : e * per]
            if has_bias:  # a column sum as a product with ones: ~8× faster than .sum(axis=0)
                _mm(ones[: len(dy_piece)].reshape(1, -1), dy_piece, db_parts[i : i + 1])
            _patches_into(x, s, e, kh, kw, stride, pads, oh, ow, piece, gather=False)
            _mm(piece.T, dy_piece, dw_parts[i])
            if input_grad:
                dpiece = dcols[: (e - s) * per]
                _mm(dy_piece, wmat_t, dpiece)
                col2im_kernel(dpiece, kh, kw, stride, pt, pl, oh, ow, dx[s:e])
                if after is not None:
                    after(dx, s, e)

    _run(work, parts)
    db = db_parts.sum(axis=0) if has_bias else None
    return dx, dw_parts.sum(axis=0).reshape(w.shape), db


#: a pooling's winners where there is no pooling (the compiled loops' placeholder)
_NO_ARG = np.empty((0, 0, 0, 0), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------


def maxpool2d_forward(
    x: np.ndarray, pool_size: tuple[int, int], stride: int
) -> tuple[np.ndarray, tuple]:
    """Max pooling: each output is the largest number in its window (no padding).

    Windows may overlap (stride < pool size). One compiled pass keeps, besides each maximum,
    where in its window it was (row-major index of the first maximum), for the backward pass.

    Returns ``y`` of shape (N, H', W', C) and a cache ``(x_shape, argmax, pool_size, stride)``.
    """
    x = np.ascontiguousarray(x)
    y, cache, body, ns = _maxpool_forward(x, pool_size, stride)
    _split(len(x), ns, body, 1.0)
    return y, cache


def _maxpool_forward(x, pool_size, stride):
    """Max pooling's output, cache, ``body(s, e)`` pooling images s..e of x (read when body
    runs), and its estimated one-thread time in ns."""
    y, cache, pool_into, ns = _maxpool_parts(x.shape, x.dtype, pool_size, stride)
    return y, cache, lambda s, e: pool_into(x[s:e], s, e), ns


def _maxpool_parts(x_shape, dtype, pool_size, stride):
    """Max pooling's output and cache for inputs of ``x_shape``, ``pool_into(src, s, e)``
    pooling ``src`` (images s..e of the input, wherever they are) into them, and the
    estimated one-thread time in ns."""
    ph, pw = pool_size
    n, h, w, c = x_shape
    oh, ow = output_size(h, ph, stride), output_size(w, pw, stride)
    y = np.empty((n, oh, ow, c), dtype=dtype)
    arg = np.empty((n, oh, ow, c), dtype=np.uint8 if ph * pw <= 256 else np.int32)
    if (ph, pw) == (2, 2):  # the common window has its own loop (see _kernels)
        kern2 = _k().maxpool2x2_forward
        pool_into = lambda src, s, e: kern2(src, stride, y[s:e], arg[s:e])  # noqa: E731
    else:
        kern = _k().maxpool2d_forward
        pool_into = lambda src, s, e: kern(src, ph, pw, stride, y[s:e], arg[s:e])  # noqa: E731
    return y, (x_shape, arg, pool_size, stride), pool_into, y.size * ph * pw * NS_PER_POOL_TAP


def maxpool2d_backward(dy: np.ndarray, cache: tuple) -> np.ndarray:
    """Gradient of max pooling: each output's gradient goes to its window's winner only.

    The winner is the element equal to the window's maximum; on a tie, the first such element
    in row-major order inside the window (as ``np.argmax`` picks it) takes the whole gradient.
    """
    dx, body = _maxpool_backward(np.ascontiguousarray(dy), cache)
    _split(len(dy), dx.size, body)
    return dx


def _maxpool_backward(dy, cache):
    """Max pooling's dx and ``body(s, e)`` filling images s..e of it."""
    x_shape = cache[0]
    dx = np.empty(x_shape, dtype=dy.dtype)
    route = _maxpool_route(dy, cache)
    return dx, lambda s, e: route(s, e, dx[s:e])


def _maxpool_route(dy, cache):
    """``route(s, e, out)``: the gradient of images s..e of max pooling's input, from its
    output's gradient dy, written into ``out`` (every element of it)."""
    _, arg, (ph, pw), stride = cache
    if (ph, pw, stride) == (2, 2, 2):  # windows that tile the input: each element written once
        kern2 = _k().maxpool2x2s2_backward
        return lambda s, e, out: kern2(dy[s:e], arg[s:e], out)
    kern = _k().maxpool2d_backward

    def route(s, e, out):
        out.fill(0)
        kern(dy[s:e], arg[s:e], pw, stride, out)

    return route


#: the backward pass of each path that works piece by piece, by the name in its cache
_PIECES_BACKWARD = {"im2col": _im2col_backward, "winograd": _winograd_backward}


#: bytes of convolution output the direct path computes at a time before pooling them, so that
#: the pooling reads them from the core's cache, not from memory. Measured (LeNet-5's first
#: convolution + pooling, 1 thread, Xeon AVX-512): per image 14.6 → 12.5 µs at batch 256 in
#: chunks of 8-32 images (18 KB each) against the thread's whole share at once.
CONV_POOL_CHUNK_BYTES = 256 << 10


def conv2d_maxpool_forward(x, w, b, stride, padding, relu, pool_size, pool_stride, keep=True):
    """:func:`conv2d_forward` (with ``relu``) then :func:`maxpool2d_forward` on its output:
    the same numbers, returned as ``(pooled, conv_cache, pool_cache)``. Each thread takes its
    images through both, a few at a time (:data:`CONV_POOL_CHUNK_BYTES`; on the im2col and
    Winograd paths piece by piece), so the pooling reads what its own core has just written,
    and the work changes hands once instead of twice (measured: a handoff costs 60-90 µs
    here, see :data:`PARALLEL_MIN_NS`).

    ``keep=False`` (inference: nothing will go backward) writes the convolution's output a
    few images at a time into a scratch array of the thread, pools it from there and keeps
    neither it nor the caches: ``(pooled, None, None)``, the same pooled numbers, without
    the full feature map's trip through memory."""
    n, h, wd, _ = x.shape
    kh, kw = w.shape[:2]
    pads = resolve_padding(padding, (h, wd), (kh, kw), stride)
    oh = output_size(h, kh, stride, *pads[0])
    ow = output_size(wd, kw, stride, *pads[1])
    cout = w.shape[3]
    x = np.ascontiguousarray(x)
    pooled, pool_cache, _, pool_ns = _maxpool_parts(
        (n, oh, ow, cout), x.dtype, pool_size, pool_stride
    )
    if not _direct(w, stride):  # each piece pooled right after it is computed
        pool = (*pool_size, pool_stride, pooled, pool_cache[1])
        if _winograd(w, stride):
            _, conv_cache = _winograd_forward(x, w, b, pads, oh, ow, relu, keep=keep, pool=pool)
        else:
            _, conv_cache = _im2col_forward(
                x, w, b, stride, pads, oh, ow, relu, keep=keep, pool=pool
            )
        return pooled, conv_cache, pool_cache if keep else None
    y, conv_cache, _, ns = _direct_forward(x, w, b, pads, oh, ow, relu, keep)
    chunk = max(1, CONV_POOL_CHUNK_BYTES // (oh * ow * cout * x.dtype.itemsize))
    bias = b if b is not None else np.zeros(cout, dtype=x.dtype)
    (pt, pb), (pl, pr) = pads
    wc, kern = np.ascontiguousarray(w), _k().conv2d_s1_maxpool_forward
    _, arg, (ph, pw), _ = pool_cache
    relu = bool(relu)
    if not keep:  # pooled straight from each image's sums; no feature map, no winners

        def pooled_body(s, e):
            _k().conv2d_s1_pooled(
                x[s:e], wc, bias, pt, pb, pl, pr, relu, oh, ow, ph, pw, pool_stride, pooled[s:e]
            )

        _split(n, ns + pool_ns, pooled_body, 1.0)
        return pooled, None, None

    def body(s, e):
        out = y[s:e] if keep else _workspace("conv_out", (min(chunk, e - s), oh, ow, cout), x.dtype)
        pool = (ph, pw, pool_stride, pooled[s:e], arg[s:e])
        kern(x[s:e], wc, bias, pt, pb, pl, pr, relu, out, keep, chunk, *pool)

    _split(n, ns + pool_ns, body, 1.0)
    return pooled, conv_cache, pool_cache if keep else None


def conv2d_maxpool_backward(dp, conv_cache, pool_cache, input_grad: bool = True):
    """The gradients of :func:`conv2d_maxpool_forward`: ``(dx, dw, db)`` of the convolution,
    from the pooled output's gradient ``dp``; on the direct path each thread takes its images
    through both backward passes."""
    dp = np.ascontiguousarray(dp, dtype=conv_cache[0].dtype)
    dy, pool = _maxpool_backward(dp, pool_cache)
    if conv_cache[5] == "im2col":  # each piece's gradient routed first
        _, arg, (ph, pw), stride = pool_cache
        route = (dp, arg, ph, pw, stride)
        return _im2col_backward(dy, conv_cache, input_grad, fill=pool, route=route)
    if conv_cache[5] is not None:  # Winograd: each piece's gradient routed first
        _, arg, (ph, pw), stride = pool_cache
        route = (dp, arg, ph, pw, stride)
        return _PIECES_BACKWARD[conv_cache[5]](dy, conv_cache, input_grad, fill=pool, route=route)
    conv, finish, ns = _direct_backward(dy, conv_cache, input_grad)

    def body(s, e):
        pool(s, e)
        conv(s, e)

    _split(len(dp), ns + dy.size * NS_PER_NUMBER, body, 1.0)
    return finish()


def avgpool2d_forward(
    x: np.ndarray, pool_size: tuple[int, int], stride: int
) -> tuple[np.ndarray, tuple]:
    """Average pooling: each output is the mean of its window (no padding)."""
    ph, pw = pool_size
    n, h, w, c = x.shape
    oh, ow = output_size(h, ph, stride), output_size(w, pw, stride)
    y = np.zeros((n, oh, ow, c), dtype=x.dtype)
    for _, _, rows, cols in _window_slices(ph, pw, stride, oh, ow):
        y += x[:, rows, cols, :]
    y *= x.dtype.type(1.0 / (ph * pw))
    return y, (x.shape, pool_size, stride)


def avgpool2d_backward(dy: np.ndarray, cache: tuple) -> np.ndarray:
    """Gradient of average pooling: each window shares its output's gradient equally."""
    x_shape, (ph, pw), stride = cache
    oh, ow = dy.shape[1], dy.shape[2]
    share = dy * dy.dtype.type(1.0 / (ph * pw))
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for _, _, rows, cols in _window_slices(ph, pw, stride, oh, ow):
        dx[:, rows, cols, :] += share
    return dx


# --------------------------------------------------------------------------------------------
# Fully connected
# --------------------------------------------------------------------------------------------


def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, tuple]:
    """Fully connected layer: ``y = x · w + b`` with x (N, in), w (in, out), b (out,)."""
    y = np.empty((len(x), w.shape[1]), dtype=np.result_type(x, w))

    def rows(s, e):
        _mm(x[s:e], w, y[s:e])
        if b is not None:
            y[s:e] += b

    _split(len(x), x.size * w.shape[1], rows, NS_PER_MAC_BLAS)
    return y, (x, w, b is not None)


def dense_backward(dy: np.ndarray, cache: tuple):
    """Returns ``(dx, dw, db)``: ``dx = dy · wᵀ``, ``dw = xᵀ · dy``, ``db = Σ_n dy``."""
    x, w, has_bias = cache
    dx = np.empty((len(dy), w.shape[0]), dtype=np.result_type(dy, w))
    dw = np.empty(w.shape, dtype=np.result_type(x, dy))
    mm = NS_PER_MAC_BLAS
    _split(len(dy), dx.size * w.shape[1], lambda s, e: _mm(dy[s:e], w.T, dx[s:e]), mm)
    # dw column by column block: each column is one product, whichever thread makes it
    body = lambda s, e: _mm(x.T, dy[:, s:e], dw[:, s:e])  # noqa: E731
    _split(w.shape[1], dw.size * len(x), body, mm)
    return dx, dw, (dy.sum(axis=0) if has_bias else None)


# --------------------------------------------------------------------------------------------
# Activations (each backward takes what its forward cached)
# --------------------------------------------------------------------------------------------


def relu_forward(x):
    """ReLU: ``max(x, 0)``. Its gradient at exactly 0 is taken as 0."""
    if _parts(len(x), x.size) == 1:
        y = np.maximum(x, 0)
        return y, y
    xf = np.ascontiguousarray(x).reshape(-1)
    y = np.empty(x.shape, dtype=x.dtype)
    yf = y.reshape(-1)
    _split(len(xf), xf.size, lambda s, e: np.maximum(xf[s:e], 0, out=yf[s:e]))
    return y, y


def relu_backward(dy, y):
    """``dy`` where the output was positive, 0 elsewhere: one compiled pass (NumPy's
    ``dy * (y > 0)`` makes two, and a temporary mask)."""
    dy = np.ascontiguousarray(dy, dtype=y.dtype)
    dx = np.empty(y.shape, dtype=y.dtype)
    dyf, yf, dxf = dy.reshape(-1), np.ascontiguousarray(y).reshape(-1), dx.reshape(-1)
    kern = _k().relu_backward
    _split(len(dyf), dyf.size, lambda s, e: kern(dyf[s:e], yf[s:e], dxf[s:e]))
    return dx


def leaky_relu_forward(x, alpha: float = 0.01):
    """Leaky ReLU: ``x`` where positive, ``alpha·x`` elsewhere."""
    pos = x > 0
    return np.where(pos, x, x * x.dtype.type(alpha)), (pos, alpha)


def leaky_relu_backward(dy, cache):
    pos, alpha = cache
    return np.where(pos, dy, dy * dy.dtype.type(alpha))


def elu_forward(x, alpha: float = 1.0):
    """ELU: ``x`` where positive, ``alpha·(eˣ − 1)`` elsewhere."""
    a = x.dtype.type(alpha)
    neg = a * np.expm1(np.minimum(x, 0))
    return np.where(x > 0, x, neg), (x > 0, neg, a)


def elu_backward(dy, cache):
    pos, neg, a = cache
    return np.where(pos, dy, dy * (neg + a))


def sigmoid(x):
    """Numerically stable logistic function ``1 / (1 + e⁻ˣ)``."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def sigmoid_forward(x):
    y = sigmoid(x)
    return y, y


def sigmoid_backward(dy, y):
    return dy * y * (1 - y)


def tanh_forward(x):
    y = np.tanh(x)
    return y, y


def tanh_backward(dy, y):
    return dy * (1 - y * y)


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax ``e^{z_k} / Σ_j e^{z_j}``, shifted by the maximum so that large logits do not
    overflow."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log softmax(z)`` computed as ``z - max - log Σ e^{z - max}``: finite for logits of ±1e4."""
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax_forward(x):
    y = softmax(x)
    return y, y


def softmax_backward(dy, y):
    """Jacobian-vector product of softmax: ``y ⊙ (dy − Σ_k dy_k y_k)``."""
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


# --------------------------------------------------------------------------------------------
# Batch normalisation and dropout
# --------------------------------------------------------------------------------------------


#: bytes of the blocks batch norm + ReLU + max pooling takes at a time (whole images, see
#: :func:`batchnorm_maxpool_forward`), and of the blocks of rows batch norm sums on dense
#: inputs. A block stays in a core's cache between the passes that read it, and is large
#: enough that the calls per block cost little (measured: blocks of 200 KB cost the fused step
#: with pooling its gain).
BLOCK_BYTES = 1 << 20


def _block_rows(shape: tuple[int, ...], itemsize: int) -> int:
    """Rows of batch norm's (M, C) view in one block: about ``BLOCK_BYTES`` of them, and for
    images whole images (at least one)."""
    row_bytes = shape[-1] * itemsize
    if len(shape) != 4:
        return max(1, BLOCK_BYTES // row_bytes)
    per = shape[1] * shape[2]
    return per * max(1, BLOCK_BYTES // (per * row_bytes))


def _moment_rows(shape: tuple[int, ...], itemsize: int) -> int:
    """Rows of batch norm's (M, C) view whose statistics and gradient sums are taken as one
    block: one image for image inputs (so that the convolution before batch norm can take the
    statistics, and the one after it the gradient sums, image by image as it writes them),
    else :func:`_block_rows`. Each block is summed on its own, then the blocks in order, so
    the sums do not depend on how many threads share the blocks, nor on which step took
    them."""
    return shape[1] * shape[2] if len(shape) == 4 else _block_rows(shape, itemsize)


def image_moments(y: np.ndarray, s: int, e: int, sums: np.ndarray, m2: np.ndarray) -> None:
    """Per image of images s..e of y (N, H, W, C), per channel: Σ y into ``sums[s:e]`` and
    Σ (y − the image's mean)² into ``m2[s:e]`` (float64), the blocks batch norm's statistics
    are made of (``_kernels.channel_block_moments``)."""
    per, c = y.shape[1] * y.shape[2], y.shape[3]
    y2 = y.reshape(-1, c)
    _k().channel_block_moments(y2[s * per : e * per], per, sums[s:e], m2[s:e])


def _channel_moments(x2: np.ndarray, rows: int, blocks_done=None) -> tuple[np.ndarray, ...]:
    """Per-channel mean and biased variance of x2 (M, C), float64, in one pass over memory:
    each block of ``rows`` rows is summed and then centred on its own mean while it is in the
    cache, and the blocks are combined exactly (Chan, Golub and LeVeque):
    ``M2 = Σ M2_b + Σ n_b·(mean_b − mean)²``, so there is no cancellation. ``blocks_done``:
    the blocks' ``(sums, m2)`` already taken (by the convolution that wrote x2)."""
    m = len(x2)
    blocks = -(-m // rows)
    if blocks_done is not None:
        sums, m2 = blocks_done
    else:
        sums, m2 = np.empty((blocks, x2.shape[1])), np.empty((blocks, x2.shape[1]))
        kern = _k().channel_block_moments
        _split(
            blocks,
            x2.size,
            lambda s, e: kern(x2[s * rows : e * rows], rows, sums[s:e], m2[s:e]),
        )
    counts = np.minimum(rows, m - rows * np.arange(blocks))[:, None]
    mean = sums.sum(axis=0) / m
    spread = (counts * (sums / counts - mean) ** 2).sum(axis=0)
    return mean, (m2.sum(axis=0) + spread) / m


def _bn_statistics(x, x2, running_mean, running_var, training, momentum, eps, moments):
    """The mean and 1/sqrt(var + eps) batch norm normalises with, in x2's dtype: the batch's
    in training (updating the running statistics in place), else the running ones (copied:
    the cache keeps them). ``moments``: see :func:`batchnorm_forward`."""
    dt = x2.dtype
    if training:
        m = len(x2)
        rows = _moment_rows(x.shape, dt.itemsize)
        if moments is not None and (len(x.shape) != 4 or moments[0].shape != (len(x), x2.shape[1])):
            raise ValueError(
                f"moments must be two (N, C) arrays of per-image sums for (N, H, W, C) inputs. "
                f"Received: {moments[0].shape} for inputs {x.shape}"
            )
        mean64, var64 = _channel_moments(x2, rows, moments)  # float64, whatever x's dtype
        mean, var = mean64.astype(dt), var64.astype(dt)
        unbiased = var * (m / max(m - 1, 1))
        running_mean *= 1 - momentum
        running_mean += momentum * mean
        running_var *= 1 - momentum
        running_var += momentum * unbiased
    else:
        mean, var = running_mean.astype(dt), running_var
    return mean, (1.0 / np.sqrt(var + eps)).astype(dt, copy=False)


def batchnorm_forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    relu: bool = False,
    moments=None,
):
    """Batch normalisation over every axis but the last (channels), PyTorch's conventions.

    Training: normalise with the batch's mean and biased variance, and update the running
    statistics in place: ``running ← (1 − momentum)·running + momentum·batch`` with the
    *unbiased* batch variance. Inference: normalise with the running statistics.

    Returns ``(y, cache)``; ``y = gamma · (x − mean) / sqrt(var + eps) + beta``. With
    ``relu``, the ReLU that follows is applied in the same pass (``Sequential`` fuses the
    pair): y is then ``max(y, 0)``, and :func:`batchnorm_backward` takes the gradient through
    both, bit for bit what the two layers give one after the other. ``moments``, in training:
    the per-image ``(sums, m2)`` of x that the convolution writing x took as it wrote it
    (:func:`conv2d_forward`), so that batch norm need not read x an extra time.
    """
    dt, c = x.dtype, x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, c)
    mean, inv_std = _bn_statistics(
        x, x2, running_mean, running_var, training, momentum, eps, moments
    )
    y = np.empty(x.shape, dtype=dt)
    # one compiled pass instead of NumPy's five (x − mean, ·inv_std, ·gamma, + beta, temporaries)
    g, bt, y2 = gamma.astype(dt, copy=False), beta.astype(dt, copy=False), y.reshape(-1, c)
    kern, relu = _k().batchnorm_apply, bool(relu)
    _split(len(x2), x2.size, lambda s, e: kern(x2[s:e], mean, inv_std, g, bt, y2[s:e], relu))
    # x itself is kept, not xhat: the backward pass recomputes xhat (one array less written)
    sum_rows = _moment_rows(x.shape, dt.itemsize)
    return y, (x2, mean, gamma, inv_std, training, x.shape, sum_rows, (g, bt) if relu else None)


def batchnorm_maxpool_forward(
    x,
    gamma,
    beta,
    running_mean,
    running_var,
    training,
    momentum,
    eps,
    pool_size,
    pool_stride,
    moments=None,
):
    """:func:`batchnorm_forward` with ``relu`` then :func:`maxpool2d_forward` on its output,
    the same numbers, returned as ``(pooled, bn_cache, pool_cache)``. After the statistics,
    each thread normalises one block of images at a time into a buffer of its own and pools
    them from there, so the full-size normalised maps are never written to memory nor read
    back, and the work changes hands once instead of twice."""
    x = np.ascontiguousarray(x)
    n, h, w, c = x.shape
    dt, per, x2 = x.dtype, h * w, x.reshape(-1, c)
    rows = _block_rows(x.shape, x.dtype.itemsize)
    mean, inv_std = _bn_statistics(
        x, x2, running_mean, running_var, training, momentum, eps, moments
    )
    g, bt = gamma.astype(dt, copy=False), beta.astype(dt, copy=False)
    images = rows // per
    pooled, pool_cache, pool_into, pool_ns = _maxpool_parts(x.shape, dt, pool_size, pool_stride)
    kern = _k().batchnorm_apply

    def body(b0, b1):
        buf = _workspace("bn", (rows, c), dt)
        for blk in range(b0, b1):
            s, e = blk * images, min(n, (blk + 1) * images)
            piece = buf[: (e - s) * per]
            kern(x2[s * per : e * per], mean, inv_std, g, bt, piece, True)
            pool_into(piece.reshape(e - s, h, w, c), s, e)

    _split(-(-n // images), x.size + pool_ns / NS_PER_NUMBER, body)
    return pooled, (x2, mean, gamma, inv_std, training, x.shape, per, (g, bt)), pool_cache


def fold_batch_norm(
    w: np.ndarray,
    b: np.ndarray | None,
    gamma: np.ndarray,
    beta: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """The kernels and biases of the one convolution that computes, at inference, a
    convolution (kernels ``w`` (KH, KW, C_in, C_out), biases ``b`` or None) followed by batch
    norm: with running statistics batch norm is a per-channel scale and shift,
    ``s = gamma / sqrt(var + eps)``, so the pair is kernels ``w·s`` and biases
    ``(b − mean)·s + beta`` (computed in float64 per channel, returned in ``w``'s dtype)."""
    cout = w.shape[-1]
    w2 = np.ascontiguousarray(w).reshape(-1, cout)
    w_out = np.empty_like(w2)
    b_out = np.empty(cout, dtype=w.dtype)
    _k().fold_batch_norm(
        w2,
        w2[0] if b is None else b,
        b is not None,
        gamma,
        beta,
        running_mean,
        running_var,
        float(eps),
        w_out,
        b_out,
    )
    return w_out.reshape(w.shape), b_out


class PendingGradient:
    """Batch norm's input gradient not written yet: ``dx = scale·dy − shift − xhat·slope``
    per channel (``batchnorm_dx``), its coefficients known. A convolution's backward pass
    whose output the batch norm normalised (:func:`conv2d_backward`) computes each piece of
    it right before using it, while it is in the cache, instead of reading a whole array
    another pass wrote; anything else calls :meth:`materialize`, that pass."""

    def __init__(self, dy2, x2, mean, inv_std, g, bt, relu, coef, shape):
        self.dy2, self.x2, self.shape = dy2, x2, shape
        self.args = (mean, inv_std, g, bt, relu, *coef)
        self.dtype = x2.dtype

    def __len__(self):
        return self.shape[0]

    def fill(self, out2: np.ndarray, lo: int, hi: int) -> None:
        """Rows lo..hi of dx (as (M, C)) into out2's rows lo..hi."""
        _k().batchnorm_dx(self.dy2[lo:hi], self.x2[lo:hi], *self.args, out2[lo:hi])

    def materialize(self) -> np.ndarray:
        dx = np.empty(self.shape, dtype=self.dtype)
        dx2 = dx.reshape(-1, self.shape[-1])
        _split(len(dx2), dx2.size, lambda s, e: self.fill(dx2, s, e))
        return dx


def batchnorm_backward(dy: np.ndarray, cache: tuple, sums=None, defer: bool = False):
    """Returns ``(dx, dgamma, dbeta)``; with ``defer``, dx as a :class:`PendingGradient`.

    In training the batch statistics depend on every input, which gives the compact form
    ``dx = inv_std · (dxhat − mean(dxhat) − xhat · mean(dxhat · xhat))`` with ``dxhat = dy ·
    gamma``; written per channel as ``dx = scale·dy − shift − xhat·slope`` (one compiled pass).
    ``sums``: the blocks' sums of dy and dy·xhat, taken already by the convolution's backward
    pass that wrote dy (:func:`batchnorm_grad_sums_taker`).
    """
    x2, mean, gamma, inv_std, training, shape, rows, fused = cache
    dt, c = x2.dtype, x2.shape[-1]
    relu = fused is not None
    g, bt = fused if relu else (gamma, gamma)  # the forward pass's gamma, beta (cast to dt)
    dy2 = np.ascontiguousarray(dy, dtype=dt).reshape(-1, c)
    blocks = -(-len(dy2) // rows)
    if sums is not None:
        sb, sg = sums
    else:
        sb, sg = np.empty((blocks, c)), np.empty((blocks, c))
        kern = _k().batchnorm_grad_sums
        _split(
            blocks,
            dy2.size,
            lambda s, e: kern(
                dy2[s * rows : e * rows],
                x2[s * rows : e * rows],
                mean,
                inv_std,
                g,
                bt,
                relu,
                rows,
                sb[s:e],
                sg[s:e],
            ),
        )
    dgamma, dbeta, coef = _bn_grad_coefficients(sb, sg, gamma, inv_std, training, len(dy2), dt)
    pending = PendingGradient(dy2, x2, mean, inv_std, g, bt, relu, coef, shape)
    return (pending if defer else pending.materialize()), dgamma, dbeta


def batchnorm_grad_sums_taker(cache: tuple):
    """For a batch norm on images (its forward ``cache``) whose input came from a convolution:
    ``(sums, take)``, where ``take(dy, s, e)`` puts into ``sums`` the per-image sums of dy and
    dy·xhat of images s..e of dy, the gradient of batch norm's output (run by the
    convolution's backward pass right after it writes those images, while they are in the
    cache); :func:`batchnorm_backward` then takes ``sums`` instead of reading dy for them."""
    x2, mean, _, inv_std, _, shape, per, fused = cache
    relu = fused is not None
    g, bt = fused if relu else (cache[2], cache[2])
    c = shape[-1]
    sb, sg = np.empty((shape[0], c)), np.empty((shape[0], c))
    kern = _k().batchnorm_grad_sums

    def take(dy, s, e):
        lo, hi = s * per, e * per
        d = dy.reshape(-1, c)[lo:hi]
        kern(d, x2[lo:hi], mean, inv_std, g, bt, relu, per, sb[s:e], sg[s:e])

    # what a compiled loop needs to take the same sums itself (_winograd_backward's)
    dt = x2.dtype
    take.native = (x2, *(a.astype(dt, copy=False) for a in (mean, inv_std, g, bt)), relu, sb, sg)
    return (sb, sg), take


def _bn_grad_coefficients(sb, sg, gamma, inv_std, training, m, dt):
    """dgamma, dbeta and ``(scale, shift, slope)`` of ``dx = scale·dy − shift − xhat·slope``
    from the blocks' sums of dy and dy·xhat, added in block order."""
    dbeta, dgamma = sb.sum(axis=0).astype(dt), sg.sum(axis=0).astype(dt)
    scale = (gamma * inv_std).astype(dt, copy=False)
    if training:
        shift = (scale * dbeta / m).astype(dt, copy=False)
        slope = (scale * dgamma / m).astype(dt, copy=False)
    else:
        shift = slope = np.zeros(len(scale), dtype=dt)
    return dgamma, dbeta, (scale, shift, slope)


def batchnorm_maxpool_backward(dp, bn_cache, pool_cache, defer: bool = False):
    """The gradients of :func:`batchnorm_maxpool_forward`: ``(dx, dgamma, dbeta)`` from the
    pooled output's gradient ``dp`` (with ``defer``, dx as a :class:`PendingGradient`).
    Each thread routes one block of images' gradient back through the pooling and sums it
    while it is in the cache; then, the sums known, dx is written from it. (Routing it again
    instead of keeping it costs more than it saves: routing is compute-bound, measured.)"""
    x2, mean, gamma, inv_std, training, shape, per, (g, bt) = bn_cache
    n, c = shape[0], shape[3]
    dt = x2.dtype
    dp = np.ascontiguousarray(dp, dtype=dt)
    images = _block_rows(shape, dt.itemsize) // per
    dy, route = _maxpool_backward(dp, pool_cache)
    dy2 = dy.reshape(-1, c)
    sb, sg = np.empty((n, c)), np.empty((n, c))  # per image, as batch norm on its own sums
    sums = _k().batchnorm_grad_sums

    def sum_blocks(b0, b1):
        for blk in range(b0, b1):
            s, e = blk * images, min(n, (blk + 1) * images)
            route(s, e)
            d, xs = dy2[s * per : e * per], x2[s * per : e * per]
            sums(d, xs, mean, inv_std, g, bt, True, per, sb[s:e], sg[s:e])

    _split(-(-n // images), x2.size + dp.size, sum_blocks)
    dgamma, dbeta, coef = _bn_grad_coefficients(sb, sg, gamma, inv_std, training, len(x2), dt)
    pending = PendingGradient(dy2, x2, mean, inv_std, g, bt, True, coef, shape)
    return (pending if defer else pending.materialize()), dgamma, dbeta


def normalise_uint8(images: np.ndarray, scale: np.ndarray, shift: np.ndarray, dtype) -> np.ndarray:
    """``images.astype(dtype) * scale − shift`` per channel for uint8 images N×H×W×C (scale
    and shift of shape (C,)), bit for bit, in one compiled pass. NumPy's broadcast over a last
    axis of 3 channels took 3.7 ns a number (0.94 ms for a batch of 64 images of 32×32×3, a
    fifth of the article network's training step; these passes: 0.04 ms)."""
    scale, shift = np.asarray(scale, dtype), np.asarray(shift, dtype)
    x = np.ascontiguousarray(images)
    y = np.empty(x.shape, dtype)
    _k().scale_channels(x.reshape(-1), scale, shift, y.reshape(-1))
    return y


def sgd_momentum_step(p, g, v, lr, momentum, weight_decay, nesterov: bool) -> None:
    """SGD with momentum on flat contiguous arrays, in place (see ``optim.SGD``): the
    optimizer's one pass over the weights instead of NumPy's five or more. Velocities that
    fall below the dtype's smallest normal number are set to 0 (measured: 61,706 subnormal
    velocities took 560 µs a step instead of 19, which slowed LeNet-5's training step by a
    sixth once most of a network's units had stopped learning)."""
    tiny = np.finfo(p.dtype).tiny.astype(p.dtype)
    _k().sgd_momentum_step(p, g, v, lr, momentum, weight_decay, bool(nesterov), tiny)


def dropout_forward(x: np.ndarray, rate: float, rng: np.random.Generator, training: bool):
    """Inverted dropout: in training each element is zeroed with probability ``rate`` and the
    survivors are scaled by ``1 / (1 − rate)``, so nothing changes at inference.

    One number is drawn from ``rng`` per call, a key; each element's coin is a counter hash of
    the key and its index (``reference.dropout_keep``), so the threads share the work, the
    mask does not depend on their number, and the backward pass recomputes it instead of
    storing it. Returns ``(y, cache)``."""
    if not training or rate == 0:
        return x, None
    key = int(rng.integers(0, 2**63))
    x = np.ascontiguousarray(x)
    cache = (key, int(np.ceil(rate * 2.0**32)), x.dtype.type(1.0 / (1.0 - rate)), x.dtype)
    return _dropout_pass(x, cache), cache


def dropout_backward(dy: np.ndarray, cache):
    """The gradient through dropout: dy where the forward pass kept an element, times its
    scale; 0 elsewhere (the mask recomputed from the cache's key)."""
    if cache is None:
        return dy
    return _dropout_pass(np.ascontiguousarray(dy, dtype=cache[3]), cache)


def _dropout_pass(x: np.ndarray, cache) -> np.ndarray:
    key, threshold, scale, _ = cache
    y = np.empty(x.shape, dtype=x.dtype)
    xf, yf, kern = x.reshape(-1), y.reshape(-1), _k().dropout_hash
    _split(len(xf), xf.size, lambda s, e: kern(xf[s:e], key, s, threshold, scale, yf[s:e]))
    return y
