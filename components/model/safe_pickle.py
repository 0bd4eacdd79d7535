"""Pickles of arrays read without trusting them (detectron2's ``.pkl`` checkpoints).

An allow-list of globals is not enough: numpy's own array and dtype constructors accept a state
that can mark raw bytes as an *object* array (pointers), and a 166-byte file then crashes the
process. So no numpy constructor ever sees the pickle's data: the globals a checkpoint of arrays
needs are stand-ins that check what they are given (a numeric dtype, a plain state, a shape
that matches the bytes) and build the array from the bytes themselves. The loaded tree is then
walked once, iteratively: only dicts, lists, tuples, strings, bytes, numbers, None and numeric
arrays come out, nested at most ``MAX_DEPTH`` deep, no container holding itself, and no more
than ``MAX_EXPANDED_ITEMS`` entries and ``MAX_EXPANDED_BYTES`` of arrays and strings counted
as a reader that copies the tree would make them: a container referenced twice counts twice.
A 377-byte pickle of shared references (ten lists of ten references to the list below, nine
deep: "billion laughs") walks in microseconds but expands to 10^9 numbers in whoever turns it
into an array, so it is refused here, not in ``np.asarray``.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import OrderedDict

import numpy as np

# the dtypes an array in a checkpoint may have: booleans, integers, floats (numpy's codes)
NUMERIC_KINDS = frozenset("biuf")
MAX_DEPTH = 32          # containers inside containers: real checkpoints nest 2-3 deep
MAX_ITEMS = 10_000_000  # containers' entries, all together
MAX_EXPANDED_ITEMS = 10_000_000   # entries once shared references are unrolled (a checkpoint has ~10^3)
MAX_EXPANDED_BYTES = 1 << 33      # 8 GiB of arrays and strings, unrolled likewise (R101 + momentum: <1 GiB)


class UnsafePickle(ValueError):
    """A pickle that asks for something a checkpoint of arrays never needs."""


class _NDArray:
    """Stands for numpy.ndarray where a pickle names it: only as _reconstruct's first argument."""


class _Dtype:
    """numpy.dtype(spec, align, copy) as a pickle builds it, checked when its state arrives:
    numeric and plain (no fields, no sub-arrays, no object references)."""

    def __init__(self, spec=None, align=False, copy=False, *rest):
        if rest or not isinstance(spec, str):
            raise UnsafePickle(f"a dtype made from {type(spec).__name__}")
        try:
            dtype = np.dtype(spec)
        except TypeError:
            raise UnsafePickle(f"dtype {spec!r}") from None
        if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise UnsafePickle(f"dtype {spec!r}: only booleans, integers and floats")
        self.dtype = dtype

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) in (8, 9)):
            raise UnsafePickle("a dtype state of an unknown shape")
        endian, subarray, names, fields, flags = state[1], state[2], state[3], state[4], state[-1]
        if subarray is not None or names is not None or fields is not None or flags not in (0,):
            raise UnsafePickle("a dtype with fields, sub-arrays or object references")
        if endian not in ("<", ">", "|", "="):
            raise UnsafePickle(f"a dtype byte order {endian!r}")
        if endian in "<>" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(endian)


def _dtype_of(value) -> np.dtype:
    if not isinstance(value, _Dtype):
        raise UnsafePickle(f"an array whose dtype is a {type(value).__name__}")
    return value.dtype


def _raw(data, what: str) -> bytes:
    if isinstance(data, str):        # a Python 2 pickle's str, read as latin-1
        return data.encode("latin-1")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, pickle.PickleBuffer):
        return bytes(data.raw())
    raise UnsafePickle(f"{what} holds a {type(data).__name__}, not bytes")


def _shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                               for n in shape) or len(shape) > 32:
        raise UnsafePickle(f"an array shape {shape!r}")
    return shape


def _array(raw: bytes, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> np.ndarray:
    if math.prod(shape) * dtype.itemsize != len(raw):
        raise UnsafePickle(f"an array of shape {shape} and dtype {dtype} with {len(raw)} bytes of data")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


class _Array:
    """numpy.core.multiarray._reconstruct(ndarray, shape, typecode) then BUILD with the array's
    state (version, shape, dtype, fortran, data): built from the data and checked dtype only."""

    def __init__(self, cls=None, shape=None, typecode=None):
        if cls is not _NDArray:
            raise UnsafePickle("_reconstruct of something other than numpy.ndarray")
        self.value = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise UnsafePickle("an array state of an unknown shape")
        _, shape, dtype, fortran, data = state
        self.value = _array(_raw(data, "an array"), _dtype_of(dtype), _shape(shape), bool(fortran))


def _scalar(dtype, data=None):
    dt = _dtype_of(dtype)
    raw = _raw(data, "a scalar")
    if len(raw) != dt.itemsize:
        raise UnsafePickle(f"a {dt} scalar of {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dt)[0].item()


def _frombuffer(buf, dtype, shape, order):
    return _array(_raw(buf, "an array"), _dtype_of(dtype), _shape(tuple(shape)), order == "F")


def _encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickle("_codecs.encode of something other than latin-1 text")
    return text.encode("latin-1")


def _empty_bytes(*args):
    if args:
        raise UnsafePickle("bytes() of something")
    return b""


_GLOBALS = {("collections", "OrderedDict"): OrderedDict, ("_codecs", "encode"): _encode,
            ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes,
            ("numpy", "ndarray"): _NDArray, ("numpy", "dtype"): _Dtype}
for _core in ("numpy.core", "numpy._core"):
    _GLOBALS.update({(f"{_core}.multiarray", "_reconstruct"): _Array, (f"{_core}.multiarray", "scalar"): _scalar,
                     (f"{_core}.numeric", "_frombuffer"): _frombuffer})


class _Unpickler(pickle.Unpickler):   # the only globals a pickle of arrays needs, as stand-ins
    def find_class(self, module, name):
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickle(f"{module}.{name}") from None


def loads_data(data: bytes):
    """A pickle's content as plain data: dicts, lists, tuples, strings, bytes, numbers, None and
    numeric numpy arrays; anything else raises ``UnsafePickle`` (nothing is called but the
    constructors above). Containers nest at most ``MAX_DEPTH`` deep."""
    tree = _Unpickler(io.BytesIO(data), encoding="latin1").load()
    return _plain(tree)


def _plain(tree):
    """The loaded tree with the stand-ins replaced by what they built, checked (iteratively,
    each object once: shared and cyclic references cost nothing extra)."""
    done: dict[int, object] = {}
    size: dict[int, tuple[int, int]] = {}   # id -> (entries, bytes) as unrolled
    building = object()   # the mark of a container whose children are being converted
    items = 0
    stack = [(tree, 0, False)]
    while stack:
        node, depth, built = stack.pop()
        key = id(node)
        if key in done and not built:
            continue
        if isinstance(node, (str, bytes, int, float, bool, type(None), np.ndarray)):
            done[key] = node
            size[key] = (1, node.nbytes if isinstance(node, np.ndarray) else
                         len(node) if isinstance(node, (str, bytes)) else 8)
            continue
        if isinstance(node, _Array):
            if node.value is None:
                raise UnsafePickle("an array without its data")
            done[key] = node.value
            size[key] = (1, node.value.nbytes)
            continue
        if not isinstance(node, (dict, list, tuple)):
            raise UnsafePickle(f"a {type(node).__name__} object")
        if depth > MAX_DEPTH:
            raise UnsafePickle(f"containers nested deeper than {MAX_DEPTH}")
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else list(node)
        if not built:
            items += len(children)
            if items > MAX_ITEMS:
                raise UnsafePickle(f"more than {MAX_ITEMS} entries")
            done[key] = building
            stack.append((node, depth, True))
            stack.extend((c, depth + 1, False) for c in children)
            continue
        if any(done.get(id(c)) is building for c in children):
            raise UnsafePickle("a container that holds itself")
        entries = len(children) + sum(size[id(c)][0] for c in children)
        nbytes = sum(size[id(c)][1] for c in children)
        if entries > MAX_EXPANDED_ITEMS or nbytes > MAX_EXPANDED_BYTES:
            raise UnsafePickle(f"shared references that unroll to more than {MAX_EXPANDED_ITEMS:,} entries or "
                               f"{MAX_EXPANDED_BYTES >> 30} GiB (a 'billion laughs' pickle)")
        size[key] = (entries, nbytes)
        conv = [done[id(c)] for c in children]
        if isinstance(node, dict):
            n = len(node)
            out = type(node)() if isinstance(node, OrderedDict) else {}
            for k, v in zip(conv[:n], conv[n:]):
                if not isinstance(k, (str, int)):
                    raise UnsafePickle(f"a mapping key of type {type(k).__name__}")
                out[k] = v
            done[key] = out
        else:
            done[key] = type(node)(conv) if isinstance(node, tuple) else conv
    return done[id(tree)]
