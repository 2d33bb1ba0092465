"""A strict stand-in for CuPy (and cuML's ``KMeans``), for running the GPU code paths on a CPU.

:func:`install` puts a fresh copy of this module into ``sys.modules["cupy"]`` (and a ``cuml``
with ``cuml.cluster.KMeans``). Its :class:`ndarray` wraps a numpy array privately and is at least
as strict as ``cupy.ndarray``, so code that passes here does not trip over CuPy's rules:

- no implicit host conversion: ``np.asarray(a)`` / ``np.array(a)`` / ``__array__`` raise CuPy's
  ``TypeError``; ``float()`` / ``int()`` / ``bool()`` only of 0-d arrays (CuPy also takes other
  size-1 arrays), and they count as a download, like ``.get()``, ``.item()``, ``.tolist()`` and
  ``repr``;
- host arrays mixed into functions, ufuncs and operators raise ``TypeError: Unsupported type
  <class 'numpy.ndarray'>`` (also from the numpy side: ``np_array + a``), Python and numpy scalars
  are fine; ``out=`` must be a device array; numpy (or list) index arrays in ``a[...]`` are
  uploaded, as CuPy does, and counted; assigning a host array into a device array raises (CuPy
  uploads it for advanced indexing only: stricter here);
- numpy functions called on device arrays run here (``__array_ufunc__``, ``__array_function__``)
  and return device arrays; a numpy function this module does not provide raises ``TypeError``;
- reductions and scalar indexing give 0-d device arrays, never host scalars; ``.get()`` and
  ``asarray`` copy, so host and device memory never alias.

Every transfer is appended to :data:`transfers`: direction, bytes, what, and the call site (the
first frame outside this module and numpy: file, line, function), then the frames above it.
``cuda.runtime.memGetInfo()`` returns :data:`memory` (set it to make a cache fit or not);
``getDeviceCount()`` returns :data:`devices`.
"""

from __future__ import annotations

import builtins
import os
import sys
import types
from typing import NamedTuple

import numpy as np

_HERE = os.path.abspath(__file__)
_NUMPY = os.path.dirname(os.path.abspath(np.__file__)) + os.sep
_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")


class Transfer(NamedTuple):
    direction: str      # "upload" (host -> device) or "download"
    nbytes: int
    what: str           # "asarray", "get", "float", "index", ...
    file: str           # the call site: the first frame outside this module and numpy
    line: int
    function: str
    callers: tuple = ()  # the next frames out, ((file, line, function), ...), innermost first

    @property
    def site(self) -> str:
        return f"{self.file}:{self.line}"

    def frames(self):
        return ((self.file, self.line, self.function), *self.callers)


transfers: list[Transfer] = []
memory = {"free": 64 * 2**30, "total": 80 * 2**30}
devices = 1
current_device = 0


def _record(direction: str, nbytes: int, what: str) -> None:
    f = sys._getframe(1)
    while f is not None and (f.f_code.co_filename == _HERE or f.f_code.co_filename.startswith(_NUMPY)):
        f = f.f_back
    frames = []
    while f is not None and len(frames) < 8:
        frames.append((f.f_code.co_filename, f.f_lineno, f.f_code.co_name))
        f = f.f_back
    site = frames[0] if frames else ("?", 0, "?")
    transfers.append(Transfer(direction, int(nbytes), what, *site, tuple(frames[1:])))


# --------------------------------------------------------------------------------------------------
# arguments
_SCALARS = (bool, int, float, complex, np.generic)


def _unsupported(x):
    return TypeError(f"Unsupported type {type(x)}")


def _arg(x, containers: bool):
    """A device array's numpy array; scalars and plain arguments as they are; host arrays refused."""
    if isinstance(x, ndarray):
        return x._a
    if x is None or x is Ellipsis or isinstance(x, (*_SCALARS, str, slice, np.dtype, type)):
        return x
    if containers and isinstance(x, (list, tuple)):
        return type(x)(_arg(v, containers) for v in x)
    raise _unsupported(x)


def _outs(out):
    """``out=`` (one array or a tuple of them): device arrays only, as CuPy demands."""
    many = isinstance(out, tuple)
    for o in out if many else (out,):
        if not isinstance(o, ndarray):
            raise TypeError(f"Output arguments must be cupy.ndarray, got {type(o)}")
    return tuple(o._a for o in out) if many else out._a


def _wrap(r, outs=()):
    """numpy results as device arrays (the ``out=`` array itself when numpy returns it)."""
    for o in outs:
        if r is o._a:
            return o
    if isinstance(r, np.ndarray):
        return ndarray._of(r)
    if isinstance(r, np.generic):
        return ndarray._of(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v, outs) for v in r)
    if isinstance(r, list):
        return [_wrap(v, outs) for v in r]
    return r


def _call(fn, args, kwargs, *, containers=True):
    outs = ()
    if kwargs.get("out") is not None:
        out = kwargs["out"]
        outs = out if isinstance(out, tuple) else (out,)
        kwargs = {**kwargs, "out": _outs(out)}
    args = tuple(_arg(a, containers) for a in args)
    kwargs = {k: (v if k == "out" else _arg(v, True)) for k, v in kwargs.items()}
    return _wrap(fn(*args, **kwargs), outs)


def _index(key):
    """An index for ``a[key]``: host index arrays (numpy or lists) are uploaded and counted."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, (np.ndarray, list)):
        host = np.asarray(key)
        if host.dtype.kind not in "biu" and host.size:
            raise IndexError(f"arrays used as indices must be of integer or boolean type (actual: {host.dtype})")
        _record("upload", host.nbytes, "index")
        return host
    if key is None or key is Ellipsis or isinstance(key, (slice, int, np.integer, bool, np.bool_)):
        return key
    raise IndexError("only integers, slices (`:`), ellipsis (`...`), numpy.newaxis (`None`) and "
                     f"integer or boolean arrays are valid indices, got {type(key)}")


# --------------------------------------------------------------------------------------------------
# the array
def _binary(name):
    fn = getattr(np, name)

    def op(self, other):
        return _call(fn, (self, other), {}, containers=False)

    def rop(self, other):
        return _call(fn, (other, self), {}, containers=False)

    def iop(self, other):
        return _call(fn, (self, other), {"out": self}, containers=False)

    return op, rop, iop


def _method(name):
    def m(self, *args, **kwargs):
        return _call(getattr(self._a, name), args, kwargs)

    m.__name__ = name
    return m


class ndarray:  # noqa: N801 (CuPy's name)
    """A device array: a private numpy array behind CuPy's rules (module doc)."""

    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, shape, dtype=float, order="C"):
        self._a = np.empty(shape, dtype=dtype, order=order)

    @classmethod
    def _of(cls, a: np.ndarray) -> ndarray:
        obj = object.__new__(cls)
        obj._a = a
        return obj

    # metadata (no transfer)
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray._of(self._a.T))
    device = property(lambda self: _cuda.Device(current_device))

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (id(self._a), False),
                "strides": None if self._a.flags.c_contiguous else self.strides, "version": 3}

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    # to the host: explicit only
    def get(self, stream=None, order="C", out=None, blocking=True):
        if out is not None:
            if not isinstance(out, np.ndarray) or out.shape != self.shape or out.dtype != self.dtype:
                raise TypeError(f"out: expected a numpy.ndarray of shape {self.shape} and dtype {self.dtype}")
            out[...] = self._a
        else:
            out = np.array(self._a, order=order, copy=True)
        _record("download", self.nbytes, "get")
        return out

    def item(self):
        if self.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        _record("download", self.nbytes, "item")
        return self._a.item()

    def tolist(self):
        _record("download", self.nbytes, "tolist")
        return self._a.tolist()

    def _scalar(self, kind, what):
        if self.ndim != 0:
            raise TypeError(f"{what}() of a device array of shape {self.shape}: only a 0-d array converts "
                            "to a Python scalar here; download it with .get() first")
        _record("download", self.nbytes, what)
        return kind(self._a)

    def __float__(self):
        return self._scalar(float, "float")

    def __int__(self):
        return self._scalar(int, "int")

    def __complex__(self):
        return self._scalar(complex, "complex")

    def __bool__(self):
        return self._scalar(bool, "bool")

    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    def __repr__(self):
        _record("download", self.nbytes, "repr")
        return "standin." + repr(self._a)

    __str__ = __repr__

    # numpy protocols: numpy calls on device arrays run here
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method not in ("__call__", "reduce", "accumulate", "outer", "at"):
            return NotImplemented
        fn = ufunc if method == "__call__" else getattr(ufunc, method)
        return _call(fn, inputs, kwargs, containers=False)

    def __array_function__(self, func, types_, args, kwargs):
        mine = _FUNCTIONS.get(func.__name__) if func.__module__ == "numpy" else None
        if mine is None:
            return NotImplemented  # numpy raises TypeError: no implementation found
        return mine(*args, **kwargs)

    # indexing
    def __getitem__(self, key):
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        if isinstance(value, ndarray):
            value = value._a
        elif not isinstance(value, _SCALARS):
            raise TypeError(f"Unsupported type {type(value)}: assigning a host value into a device array; "
                            "upload it with cupy.asarray first")
        self._a[_index(key)] = value

    # methods
    def reshape(self, *shape, order="C"):
        return ndarray._of(self._a.reshape(*shape, order=order))

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return ndarray._of(self._a.astype(dtype, order=order, copy=copy))

    def fill(self, value):
        if not isinstance(value, _SCALARS):
            raise _unsupported(value)
        self._a.fill(value)

    def __neg__(self):
        return _call(np.negative, (self,), {})

    def __pos__(self):
        return _call(np.positive, (self,), {})

    def __abs__(self):
        return _call(np.absolute, (self,), {})

    def __invert__(self):
        return _call(np.invert, (self,), {})

    def __copy__(self):
        return self.copy()

    def __reduce__(self):
        raise TypeError("a stand-in device array cannot be pickled here")


for _n in ("sum", "prod", "max", "min", "argmax", "argmin", "mean", "var", "std", "any", "all", "cumsum", "clip",
           "dot", "ravel", "flatten", "copy", "transpose", "squeeze", "swapaxes", "take", "repeat", "argsort",
           "sort", "nonzero", "round", "conj", "view"):
    setattr(ndarray, _n, _method(_n))
for _n, _f in (("add", "add"), ("sub", "subtract"), ("mul", "multiply"), ("truediv", "true_divide"),
               ("floordiv", "floor_divide"), ("mod", "remainder"), ("pow", "power"), ("matmul", "matmul"),
               ("and", "bitwise_and"), ("or", "bitwise_or"), ("xor", "bitwise_xor"), ("lshift", "left_shift"),
               ("rshift", "right_shift")):
    for _name, _op in zip((f"__{_n}__", f"__r{_n}__", f"__i{_n}__"), _binary(_f)):
        setattr(ndarray, _name, _op)
for _n, _f in (("lt", "less"), ("le", "less_equal"), ("gt", "greater"), ("ge", "greater_equal"),
               ("eq", "equal"), ("ne", "not_equal")):
    setattr(ndarray, f"__{_n}__", _binary(_f)[0])
ndarray.__hash__ = None  # unhashable, like numpy's and CuPy's arrays
del _n, _f, _name, _op


# --------------------------------------------------------------------------------------------------
# functions
def _upload(obj, dtype=None, order="K", copy=True):
    """Host data onto the device: a copy, counted (CuPy copies host memory to the device)."""
    if isinstance(obj, ndarray):
        a = obj._a.astype(dtype if dtype is not None else obj.dtype, order=order, copy=copy)
        return obj if a is obj._a else ndarray._of(a)
    if not isinstance(obj, (np.ndarray, list, tuple, *_SCALARS)):
        raise _unsupported(obj)
    a = np.array(obj, dtype=dtype, order=order, copy=True)
    if a.dtype.kind not in "biufc":
        raise ValueError(f"Unsupported dtype {a.dtype}")
    _record("upload", a.nbytes, "asarray")
    return ndarray._of(a)


def asarray(a, dtype=None, order=None, *, blocking=False):
    return _upload(a, dtype, order or "K", copy=False)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    out = _upload(obj, dtype, order, copy=copy)
    return out if out.ndim >= ndmin else out.reshape((1,) * (ndmin - out.ndim) + out.shape)


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        return a.get(stream, order, out, blocking)
    return np.asarray(a, order=order)


def get_array_module(*args):
    return sys.modules[__name__] if builtins.any(isinstance(a, ndarray) for a in args) else np


def _function(name, containers=True):
    fn = getattr(np, name)

    def f(*args, **kwargs):
        return _call(fn, args, kwargs, containers=containers)

    f.__name__ = f.__qualname__ = name
    return f


_UFUNCS = ("add", "subtract", "multiply", "divide", "true_divide", "floor_divide", "power", "remainder",
           "maximum", "minimum", "fmax", "fmin", "negative", "positive", "absolute", "abs", "sign", "exp", "exp2",
           "expm1", "log", "log2", "log10", "log1p", "logaddexp", "logaddexp2", "sqrt", "square", "reciprocal",
           "floor", "ceil", "rint", "isfinite", "isnan", "isinf", "greater", "greater_equal", "less",
           "less_equal", "equal", "not_equal", "logical_and", "logical_or", "logical_not", "invert", "matmul")
_OTHERS = ("sum", "prod", "max", "min", "amax", "amin", "argmax", "argmin", "mean", "var", "std", "any", "all",
           "cumsum", "dot", "concatenate", "stack", "vstack", "hstack", "where", "clip", "argsort", "sort",
           "take", "take_along_axis", "tile", "repeat", "reshape", "ravel", "transpose", "squeeze",
           "expand_dims", "flatnonzero", "nonzero", "count_nonzero", "searchsorted", "unique", "cumsum",
           "empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like", "arange",
           "linspace", "eye", "einsum", "outer", "diag", "isclose", "allclose", "ascontiguousarray", "copy")
_FUNCTIONS: dict = {}
for _n in _UFUNCS + _OTHERS:
    _FUNCTIONS[_n] = _function(_n, containers=_n not in _UFUNCS)
_FUNCTIONS.update(asarray=asarray, array=array)
globals().update(_FUNCTIONS)  # cupy.sum, cupy.max, ...: module code below uses builtins.max
del _n

for _n in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint32", "uint64",
           "bool_", "complex64", "complex128", "dtype", "finfo", "iinfo", "newaxis", "inf", "nan", "pi", "e",
           "integer", "floating", "issubdtype", "result_type", "promote_types"):
    globals()[_n] = getattr(np, _n)
del _n


# --------------------------------------------------------------------------------------------------
# cupy.cuda
class CUDARuntimeError(RuntimeError):
    pass


def _get_device_count():
    if devices < 1:
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    return devices


def _set_device(i):
    global current_device
    if not 0 <= int(i) < _get_device_count():
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    current_device = int(i)


class Device:
    def __init__(self, device=None):
        self.id = current_device if device is None else int(device)

    def use(self):
        _set_device(self.id)

    def synchronize(self):
        pass

    def __enter__(self):
        self._previous = current_device
        self.use()
        return self

    def __exit__(self, *exc):
        _set_device(self._previous)


_runtime = types.SimpleNamespace(
    getDeviceCount=_get_device_count,
    memGetInfo=lambda: (int(memory["free"]), int(memory["total"])),
    getDevice=lambda: current_device,
    setDevice=_set_device,
    CUDARuntimeError=CUDARuntimeError,
)
_cuda = types.SimpleNamespace(runtime=_runtime, Device=Device, CUDARuntimeError=CUDARuntimeError)
cuda = _cuda


# --------------------------------------------------------------------------------------------------
# cuml.cluster.KMeans
kmeans_fits: list[dict] = []


class KMeans:
    """``cuml.cluster.KMeans``'s constructor (the arguments common to cuML 24.10 to 25.x: keyword-only,
    no ``handle``); ``fit`` runs scikit-learn on the host copy (uncounted: it stands for device work)."""

    def __init__(self, *, n_clusters=8, max_iter=300, tol=1e-4, verbose=False, random_state=None,
                 init="scalable-k-means++", n_init="auto", oversampling_factor=2.0, max_samples_per_batch=32768,
                 output_type=None):
        if init not in ("scalable-k-means++", "k-means||", "k-means++", "random"):
            raise ValueError(f"init: unsupported {init!r}")
        if output_type not in (None, "input", "cupy", "numpy", "array"):
            raise ValueError(f"output_type: unsupported {output_type!r}")
        self.n_clusters, self.max_iter, self.tol, self.random_state = n_clusters, max_iter, tol, random_state
        self.init, self.n_init, self.output_type = init, n_init, output_type

    def fit(self, X, y=None, sample_weight=None):
        from sklearn.cluster import KMeans as SkKMeans

        if isinstance(X, ndarray):
            host, on_device = X._a, True
        elif isinstance(X, np.ndarray):
            host, on_device = X, False
            _record("upload", X.nbytes, "cuml")
        else:
            raise TypeError(f"X: expected a device or numpy array, got {type(X)}")
        kmeans_fits.append({"shape": host.shape, "dtype": host.dtype, "on_device": on_device,
                            "n_clusters": self.n_clusters, "max_iter": self.max_iter, "init": self.init,
                            "n_init": self.n_init, "random_state": self.random_state})
        init = "k-means++" if self.init in ("scalable-k-means++", "k-means||", "k-means++") else "random"
        sk = SkKMeans(self.n_clusters, init=init, n_init=1 if self.n_init == "auto" else self.n_init,
                      max_iter=self.max_iter, tol=self.tol, random_state=self.random_state).fit(host)
        numpy_out = self.output_type == "numpy" or (self.output_type in (None, "input") and not on_device)
        conv = (lambda a: a) if numpy_out else ndarray._of
        self.cluster_centers_, self.labels_ = conv(sk.cluster_centers_), conv(sk.labels_.astype(np.int32))
        self.inertia_, self.n_iter_ = sk.inertia_, sk.n_iter_
        return self


# --------------------------------------------------------------------------------------------------
def install(monkeypatch, free: int | None = None, total: int | None = None, count: int = 1):
    """A fresh copy of this module as ``sys.modules["cupy"]``, with ``cuml`` and ``cuml.cluster``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cupy", _HERE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.devices = count
    if free is not None:
        mod.memory["free"] = int(free)
    mod.memory["total"] = int(total if total is not None else builtins.max(mod.memory["free"], mod.memory["total"]))
    cuml = types.ModuleType("cuml")
    cluster = types.ModuleType("cuml.cluster")
    cluster.KMeans = cuml.KMeans = mod.KMeans
    cuml.cluster = cluster
    monkeypatch.setitem(sys.modules, "cupy", mod)
    monkeypatch.setitem(sys.modules, "cuml", cuml)
    monkeypatch.setitem(sys.modules, "cuml.cluster", cluster)
    return mod
