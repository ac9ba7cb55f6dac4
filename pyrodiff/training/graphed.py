"""The training step without host synchronisation, and captured once as a CUDA graph.

On a GPU a training step is bound by the host when it is small: every kernel launch costs tens of
microseconds, and every read of a tensor's value on the host (``.item()``, ``bool(t)``, a copy from the host)
waits for the device to finish everything queued.  Two things make the Pyro program's step free of them:

- :func:`elbo_on_device`: Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO`` read the loss on the host in
  ``differentiable_loss`` (``torch_item``, twice with ``TraceMeanField_ELBO``, more with ``Trace_ELBO``, which
  converts every site's log-density sum) and check it for NaN (``warn_if_nan``: ``bool(isnan(loss))``, and a
  backward hook that does the same for the gradient).  The estimator it returns runs Pyro's own methods (the
  same code objects) with those two names bound, in its own copy of their module's namespace, to helpers that
  keep values on the device: ``torch_item`` detaches instead of reading, ``warn_if_nan`` returns its argument
  (the training loop checks the losses for NaN itself, at its logging interval).  Pyro's modules are never
  changed, so every other ELBO in the process, in any thread, keeps its reads and checks.  The loss has the same
  value and the same gradient (``tests/test_host_sync.py``).
- :class:`pyrodiff.cuda_graph.GraphedStep` (shared with the samplers): the step, captured once as a CUDA graph
  and replayed: one launch for the whole forward, backward, clipping, AdamW and EMA update.

The graph is CUDA only; elsewhere the same step runs eagerly (still without host reads).
"""

from __future__ import annotations

import copy
import functools
import inspect
import numbers
import types

from pyro.infer.elbo import ELBO

__all__ = ["elbo_on_device"]

#: the host-reading helpers of Pyro's ELBO modules, by name, with their device-keeping replacements (below)
_HELPERS = ("torch_item", "warn_if_nan")


def _detach(x):
    """``torch_item`` without the host read: a tensor stays on the device (detached), a number stays a number."""
    return x if isinstance(x, numbers.Number) else x.detach()


def _unchecked(value, *args, **kwargs):
    """``warn_if_nan`` without its check (a host read) and without its gradient hook (another, in backward)."""
    return value


_ON_DEVICE = {"torch_item": _detach, "warn_if_nan": _unchecked}


def _names(code: types.CodeType) -> set[str]:
    """The global names ``code`` and the functions nested in it use."""
    nested = (_names(c) for c in code.co_consts if isinstance(c, types.CodeType))
    return set(code.co_names).union(*nested)


def _rebound(function: types.FunctionType) -> types.FunctionType:
    """Pyro's ``function`` (its code, defaults and closure) looking up :data:`_HELPERS` in a copy of its module's
    namespace where they keep values on the device."""
    namespace = {**function.__globals__, **_ON_DEVICE}
    rebound = types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__
    )
    rebound.__kwdefaults__ = function.__kwdefaults__
    return functools.update_wrapper(rebound, function, updated=())


def _on_device_class(cls: type[ELBO]) -> type[ELBO]:
    """A subclass of ``cls`` whose methods that use :data:`_HELPERS` (as ``cls`` resolves them) are :func:`_rebound`.
    A method of a subclass of Pyro's that calls Pyro's through ``super()`` reaches Pyro's unchanged one (the reads
    then stay; the values are the same)."""
    methods = {}
    for name in dir(cls):
        method = inspect.getattr_static(cls, name)  # the one the class resolves to, through its MRO
        if isinstance(method, types.FunctionType) and _names(method.__code__) & set(_HELPERS):
            methods[name] = _rebound(method)
    return type(f"{cls.__name__}OnDevice", (cls,), {"__module__": __name__, **methods})


def elbo_on_device(elbo: ELBO) -> ELBO:
    """A copy of Pyro's estimator ``elbo`` (``Trace_ELBO``, ``TraceMeanField_ELBO``, ...) that computes its loss
    without reading it on the host (see the module's docstring): same value, same gradient, no synchronisation.
    It is of a subclass of ``elbo``'s class; ``elbo`` itself and Pyro's modules are left as they are."""
    if not isinstance(elbo, ELBO):
        raise TypeError(f"elbo_on_device needs a Pyro ELBO instance, got {type(elbo).__name__}")
    on_device = copy.copy(elbo)
    on_device.__class__ = _on_device_class(type(elbo))
    return on_device
