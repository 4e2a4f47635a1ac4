"""A pickle opcode interpreter for torch checkpoints: the handful of globals these files name, no
calls, no mutation of objects from outside this load, every object charged to the budget."""

from __future__ import annotations

import collections
import math
import pickletools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    _COST_DICT_ITEM,
    _COST_ITEM,
    _COST_MEMO,
    _COST_OBJ,
    _MAX_DIM,
    _MAX_GLOBAL_NAME,
    _MAX_LONG,
    _MAX_MARKS,
    _MAX_STORAGE_KEY,
    _STORAGE_DTYPES,
    MAX_DEPTH,
    MAX_EXPANDED,
    MAX_NDIM,
    CheckpointError,
    HParams,
    _Budget,
    short_repr,
)

# ------------------------------------------------------------------------------------ pickle


class _Global:
    """A global the pickle named and we allow: a plain, immutable token, never a live object."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "name", name)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("read-only")

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


_ORDERED_DICT = _Global("collections", "OrderedDict")
_REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
_REBUILD_PARAMETER = _Global("torch._utils", "_rebuild_parameter")
_HPARAMS = _Global("utils", "HParams")
_STORAGE_GLOBALS = {name: _Global("torch", name) for name in _STORAGE_DTYPES}
_ALLOWED_GLOBALS: dict[tuple[str, str], _Global] = {
    (g.module, g.name): g for g in (_ORDERED_DICT, _REBUILD_TENSOR, _REBUILD_PARAMETER, _HPARAMS,
                                    *_STORAGE_GLOBALS.values())
}


@dataclass(repr=False)
class _Storage:
    key: str
    type_name: str
    data: np.ndarray  # 1-D, in the storage's own dtype
    handed_out: bool = False  # `data` itself became a tensor: later views of it must copy

    def __repr__(self) -> str:
        return f"<storage '{self.key}' {self.type_name}[{self.data.size}]>"


def _contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    step = 1
    for s, st in zip(reversed(size), reversed(stride)):
        if s != 1 and st != step:
            return False
        step *= s
    return True


_OP_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
_SCALAR_KEY_TYPES = (str, int, float, bool, type(None), bytes)


def _is_key(value: Any) -> bool:
    # dict keys must hash without recursion: scalars, or a flat tuple of scalars
    if isinstance(value, _SCALAR_KEY_TYPES):
        return True
    return type(value) is tuple and all(isinstance(v, _SCALAR_KEY_TYPES) for v in value)


class _SafeUnpickler:
    """A pickle interpreter for what `torch.save` writes (protocol 2; protocols 3-4 opcodes too).

    It resolves only `_ALLOWED_GLOBALS` (to immutable tokens), calls only the tensor rebuilders and
    `OrderedDict()`, instantiates only `HParams`, applies BUILD only to an `HParams`/`OrderedDict`
    this very load created, and charges every object to the budget. Text-protocol opcodes,
    extension codes, sets and out-of-band buffers are refused.
    """

    def __init__(self, data: bytes, *, path: Path, budget: _Budget, load_storage):
        self.data = data
        self.path = path
        self.budget = budget
        self.load_storage = load_storage
        self.pos = 0
        self._fresh: set[int] = set()  # ids of HParams/OrderedDicts created by this load
        self._keep: list[Any] = []  # keeps them alive so their ids stay theirs

    # -- errors and reading

    def _bad(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: malformed pickle data ({what} at byte {self.pos}); the file is damaged")

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise self._bad(f"a {n}-byte field runs past the end of data.pkl")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def _line(self) -> str:
        end = self.data.find(b"\n", self.pos, self.pos + _MAX_GLOBAL_NAME + 1)
        if end < 0:
            raise self._bad("GLOBAL name too long or unterminated")
        raw = self.data[self.pos:end]
        self.pos = end + 1
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self._bad("non-ASCII GLOBAL name") from None

    def _u(self, n: int) -> int:
        return int.from_bytes(self._take(n), "little")

    def _str(self, n: int) -> str:
        raw = self._take(n)
        self.budget.charge(_COST_OBJ + 2 * n, "pickled strings")
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise self._bad("invalid UTF-8 string") from None

    def _bytes(self, n: int) -> bytes:
        self.budget.charge(_COST_OBJ + 2 * n, "pickled bytes")
        return self._take(n)

    # -- the interpreter

    def load(self) -> Any:
        stack: list[Any] = []
        marks: list[list[Any]] = []
        memo: dict[int, Any] = {}
        budget = self.budget
        data = self.data
        n_data = len(data)

        def pop_mark() -> list[Any]:
            nonlocal stack
            if not marks:
                raise self._bad("no MARK on the stack")
            items = stack
            stack = marks.pop()
            return items

        def pop() -> Any:
            if not stack:
                raise self._bad("stack underflow")
            return stack.pop()

        def top() -> Any:
            if not stack:
                raise self._bad("stack underflow")
            return stack[-1]

        def push(value: Any, cost: int = _COST_OBJ) -> None:
            budget.charge(cost + _COST_ITEM, "pickled objects")
            stack.append(value)

        def set_items(target: Any, items: list[Any]) -> None:
            if not isinstance(target, dict) or len(items) % 2:
                raise self._bad("SETITEM(S) without a dict and key/value pairs")
            budget.charge(_COST_DICT_ITEM * (len(items) // 2), "pickled dict entries")
            for i in range(0, len(items), 2):
                if not _is_key(items[i]):
                    raise self._bad(f"a dict key of type {type(items[i]).__name__}")
                target[items[i]] = items[i + 1]

        def append_items(target: Any, items: list[Any]) -> None:
            if type(target) is not list:
                raise self._bad("APPEND(S) to something that is not a list")
            budget.charge(_COST_ITEM * len(items), "pickled list items")
            target.extend(items)

        while True:
            if self.pos >= n_data:
                raise self._bad("data.pkl ends without STOP")
            op = data[self.pos]
            self.pos += 1
            if op == 0x80:  # PROTO
                proto = self._u(1)
                if proto > 5:
                    raise self._bad(f"pickle protocol {proto}")
            elif op == 0x95:  # FRAME (protocol 4): a length hint, the ops follow inline
                self._take(8)
            elif op == 0x2E:  # STOP
                result = pop()
                return result
            elif op == 0x28:  # MARK
                if len(marks) >= _MAX_MARKS:
                    raise self._bad(f"more than {_MAX_MARKS} nested MARKs")
                budget.charge(_COST_OBJ, "pickle marks")
                marks.append(stack)
                stack = []
            elif op == 0x30:  # POP
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif op == 0x31:  # POP_MARK
                pop_mark()
            elif op == 0x32:  # DUP
                push(top(), 0)
            elif op == 0x4E:  # NONE
                push(None, 0)
            elif op == 0x88:  # NEWTRUE
                push(True, 0)
            elif op == 0x89:  # NEWFALSE
                push(False, 0)
            elif op == 0x4A:  # BININT
                push(int.from_bytes(self._take(4), "little", signed=True))
            elif op == 0x4B:  # BININT1
                push(self._u(1))
            elif op == 0x4D:  # BININT2
                push(self._u(2))
            elif op in (0x8A, 0x8B):  # LONG1, LONG4
                n = self._u(1) if op == 0x8A else int.from_bytes(self._take(4), "little", signed=True)
                if n < 0 or n > _MAX_LONG:
                    raise self._bad(f"a {n}-byte integer")
                push(int.from_bytes(self._take(n), "little", signed=True), _COST_OBJ + n)
            elif op == 0x47:  # BINFLOAT
                push(struct.unpack(">d", self._take(8))[0])
            elif op == 0x8C:  # SHORT_BINUNICODE
                push(self._str(self._u(1)), 0)
            elif op == 0x58:  # BINUNICODE
                push(self._str(self._u(4)), 0)
            elif op == 0x8D:  # BINUNICODE8
                push(self._str(self._u(8)), 0)
            elif op in (0x55, 0x54):  # SHORT_BINSTRING, BINSTRING (Python 2 str)
                n = self._u(1) if op == 0x55 else int.from_bytes(self._take(4), "little", signed=True)
                raw = self._bytes(n)
                try:
                    push(raw.decode("ascii"), 0)
                except UnicodeDecodeError:
                    raise self._bad("non-ASCII Python 2 string") from None
            elif op == 0x43:  # SHORT_BINBYTES
                push(self._bytes(self._u(1)), 0)
            elif op == 0x42:  # BINBYTES
                push(self._bytes(self._u(4)), 0)
            elif op == 0x8E:  # BINBYTES8
                push(self._bytes(self._u(8)), 0)
            elif op == 0x29:  # EMPTY_TUPLE
                push(())
            elif op == 0x74:  # TUPLE
                items = pop_mark()
                push(tuple(items), _COST_OBJ + _COST_ITEM * len(items))
            elif op in (0x85, 0x86, 0x87):  # TUPLE1-3
                k = op - 0x84
                if len(stack) < k:
                    raise self._bad("stack underflow")
                items = stack[-k:]
                del stack[-k:]
                push(tuple(items), _COST_OBJ + _COST_ITEM * k)
            elif op == 0x5D:  # EMPTY_LIST
                push([])
            elif op == 0x6C:  # LIST
                items = pop_mark()
                push(items, _COST_OBJ + _COST_ITEM * len(items))
            elif op == 0x61:  # APPEND
                value = pop()
                append_items(top(), [value])
            elif op == 0x65:  # APPENDS
                items = pop_mark()
                append_items(top(), items)
            elif op == 0x7D:  # EMPTY_DICT
                push({})
            elif op == 0x64:  # DICT
                items = pop_mark()
                d: dict = {}
                set_items(d, items)
                push(d)
            elif op == 0x73:  # SETITEM
                value = pop()
                key = pop()
                set_items(top(), [key, value])
            elif op == 0x75:  # SETITEMS
                items = pop_mark()
                set_items(top(), items)
            elif op == 0x63:  # GLOBAL
                module = self._line()
                name = self._line()
                push(self._find_global(module, name))
            elif op == 0x93:  # STACK_GLOBAL
                name = pop()
                module = pop()
                if not (isinstance(module, str) and isinstance(name, str)):
                    raise self._bad("STACK_GLOBAL without two strings")
                push(self._find_global(module, name))
            elif op == 0x52:  # REDUCE
                args = pop()
                func = pop()
                push(self._reduce(func, args))
            elif op == 0x81:  # NEWOBJ
                args = pop()
                cls = pop()
                push(self._new(cls, args, {}))
            elif op == 0x92:  # NEWOBJ_EX
                kwargs = pop()
                args = pop()
                cls = pop()
                push(self._new(cls, args, kwargs))
            elif op == 0x62:  # BUILD
                state = pop()
                self._build(top(), state)
            elif op == 0x51:  # BINPERSID
                pid = pop()
                push(self._persistent(pid), 0)
            elif op in (0x71, 0x72, 0x94):  # BINPUT, LONG_BINPUT, MEMOIZE
                index = self._u(1) if op == 0x71 else self._u(4) if op == 0x72 else len(memo)
                budget.charge(_COST_MEMO, "the pickle memo")
                memo[index] = top()
            elif op in (0x68, 0x6A):  # BINGET, LONG_BINGET
                index = self._u(1) if op == 0x68 else self._u(4)
                try:
                    push(memo[index], 0)
                except KeyError:
                    raise self._bad(f"memo entry {index} was never stored") from None
            else:
                name = _OP_NAMES.get(op, f"byte {op:#04x}")
                raise CheckpointError(
                    f"{self.path}: pickle opcode {name} at byte {self.pos - 1} is not one torch.save writes; "
                    "refusing the file (it is damaged, or not a PyTorch checkpoint)"
                )

    # -- the only calls a file can make

    def _find_global(self, module: str, name: str) -> _Global:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: refusing to load global '{module}.{name}'. Checkpoints may only "
                "contain tensors, OrderedDicts and utils.HParams; this file is not a GPT-SoVITS "
                "checkpoint or was written by unknown code. Re-export it or obtain a clean copy."
            ) from None

    def _fresh_object(self, obj: Any) -> Any:
        self._fresh.add(id(obj))
        self._keep.append(obj)
        return obj

    def _reduce(self, func: Any, args: Any) -> Any:
        if type(args) is not tuple:
            raise self._bad("REDUCE arguments are not a tuple")
        if func is _ORDERED_DICT:
            if args == ():
                return self._fresh_object(collections.OrderedDict())
            if len(args) == 1 and type(args[0]) is list:
                out = collections.OrderedDict()
                pairs = args[0]
                if not all(type(p) is tuple and len(p) == 2 and _is_key(p[0]) for p in pairs):
                    raise self._bad("OrderedDict() from something other than (key, value) pairs")
                self.budget.charge(_COST_DICT_ITEM * len(pairs), "pickled dict entries")
                out.update(pairs)
                return self._fresh_object(out)
            raise self._bad("OrderedDict() with unexpected arguments")
        if func is _REBUILD_TENSOR:
            if not 4 <= len(args) <= 7:
                raise self._bad(f"_rebuild_tensor_v2 with {len(args)} arguments")
            return self._rebuild_tensor(*args[:4])
        if func is _REBUILD_PARAMETER:
            if not 1 <= len(args) <= 3 or not isinstance(args[0], np.ndarray):
                raise self._bad("_rebuild_parameter without a tensor")
            return args[0]
        raise CheckpointError(f"{self.path}: the pickle calls {short_repr(func)}, which only constructs objects; "
                              "refusing the file (it is damaged, or not a PyTorch checkpoint)")

    def _new(self, cls: Any, args: Any, kwargs: Any) -> Any:
        if cls is _HPARAMS and args == () and kwargs == {}:
            return self._fresh_object(HParams())
        if cls is _ORDERED_DICT and args == () and kwargs == {}:
            return self._fresh_object(collections.OrderedDict())
        raise CheckpointError(f"{self.path}: the pickle instantiates {short_repr(cls)} with {type(args).__name__} "
                              "arguments; only utils.HParams() is allowed. Refusing the file.")

    def _build(self, inst: Any, state: Any) -> None:
        # only objects this load made; never the tokens of the globals, never a shared object
        if id(inst) not in self._fresh or type(inst) not in (HParams, collections.OrderedDict):
            raise CheckpointError(f"{self.path}: the pickle sets the state of a {type(inst).__name__}, which "
                                  "torch.save never does; refusing the file (it is damaged or hostile)")
        if type(state) is tuple and len(state) == 2 and state[1] is None:
            state = state[0]
        if type(state) is not dict or not all(type(k) is str for k in state):
            raise self._bad(f"BUILD state of type {type(state).__name__}")
        if type(inst) is HParams:
            self.budget.charge(_COST_DICT_ITEM * len(state), "pickled HParams entries")
            inst.update(state)
        # an OrderedDict's state is its attributes (e.g. state_dict()._metadata): not needed, dropped

    def _persistent(self, pid: Any) -> _Storage:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise self._bad(f"unsupported persistent id {short_repr(pid)}")
        _tag, storage_type, key, location, numel = pid
        if not (isinstance(storage_type, _Global) and storage_type.module == "torch"
                and storage_type.name in _STORAGE_DTYPES):
            raise self._bad(f"unsupported storage type {short_repr(storage_type)}")
        if not (type(key) is str and 0 < len(key) <= _MAX_STORAGE_KEY and "/" not in key and "\\" not in key):
            raise self._bad(f"storage key {short_repr(key)}")
        if type(location) is not str or type(numel) is not int or numel < 0:
            raise self._bad(f"storage '{key}' with location {short_repr(location)} and {short_repr(numel)} elements")
        return self.load_storage(storage_type.name, key, numel)

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> np.ndarray:
        """`torch._utils._rebuild_tensor_v2`: a strided view of a storage, validated, then copied."""
        if not isinstance(storage, _Storage):
            raise self._bad("_rebuild_tensor_v2 without a storage")
        if type(size) not in (tuple, list) or type(stride) not in (tuple, list):
            raise self._bad("tensor size/stride are not tuples")
        if not all(type(v) is int for v in (offset, *size, *stride)):
            raise self._bad("tensor offset/size/stride are not integers")
        where = f"tensor on storage '{storage.key}' (offset {offset}, size {tuple(size)}, stride {tuple(stride)})"
        if len(size) != len(stride) or len(size) > MAX_NDIM:
            raise self._bad(f"{where}: {len(size)} sizes, {len(stride)} strides")
        if offset < 0 or any(s < 0 for s in size) or any(st < 0 for st in stride):
            raise self._bad(f"{where}: negative offset, size or stride")
        numel = math.prod(size)
        base = storage.data
        if numel == 0:
            if any(s > _MAX_DIM for s in size) or math.prod(s for s in size if s) >= 2**62 or offset > base.size:
                raise self._bad(f"{where}: empty tensor with an impossible shape")
            arr = np.zeros(size, dtype=base.dtype)
        else:
            if numel > base.size:
                # also refuses zero-stride expansions: they would let a tiny file fill memory
                raise self._bad(f"{where}: {numel} elements from a storage of {base.size}")
            last = offset + sum((s - 1) * st for s, st in zip(size, stride))
            if last >= base.size:
                raise self._bad(f"{where}: reads element {last} of a storage of {base.size}")
            item = base.itemsize
            if (not storage.handed_out and offset == 0 and numel == base.size
                    and _contiguous(tuple(size), tuple(stride))):
                # the usual case, one tensor per storage: the freshly read buffer becomes the tensor
                storage.handed_out = True
                arr = base.reshape(tuple(size))
            else:
                out_item = 4 if storage.type_name == "BFloat16Storage" else item
                self.budget.charge(numel * out_item + _COST_OBJ, f"tensors (now on storage '{storage.key}')")
                # numpy re-checks the extent against the buffer; the copy keeps a 0-d shape as ()
                view = np.ndarray(tuple(size), dtype=base.dtype, buffer=base, offset=offset * item,
                                  strides=tuple(st * item for st in stride))
                arr = view.copy()
        if storage.type_name == "BFloat16Storage":
            wide = arr.astype(np.uint32)
            wide <<= 16
            arr = wide.view(np.float32)
        return arr

    def check_tree(self, root: Any) -> None:
        """Refuse cycles, nesting deeper than MAX_DEPTH and trees that shared references expand past
        MAX_EXPANDED values (printing or walking them naively would never end). One pass, each
        container once."""
        height: dict[int, int] = {}
        expanded: dict[int, int] = {}
        on_path: set[int] = set()
        work: list[tuple[Any, bool]] = [(root, False)]
        while work:
            obj, done = work.pop()
            if not isinstance(obj, (dict, list, tuple)):
                continue
            oid = id(obj)
            if done:
                children = [c for c in (obj.values() if isinstance(obj, dict) else obj)
                            if isinstance(c, (dict, list, tuple))]
                height[oid] = 1 + max((height[id(c)] for c in children), default=0)
                expanded[oid] = 1 + len(obj) + sum(expanded[id(c)] for c in children)
                on_path.discard(oid)
                if height[oid] > MAX_DEPTH:
                    raise CheckpointError(f"{self.path}: the pickled object nests deeper than {MAX_DEPTH} "
                                          "levels; no checkpoint does, the file is damaged or hostile")
                if expanded[oid] > MAX_EXPANDED:
                    raise CheckpointError(f"{self.path}: shared references make the pickled object expand to "
                                          f"more than {MAX_EXPANDED:,} values; the file is damaged or hostile")
                continue
            if oid in height:
                continue
            if oid in on_path:
                raise CheckpointError(f"{self.path}: the pickled object contains itself; checkpoints are trees, "
                                      "the file is damaged or hostile")
            on_path.add(oid)
            work.append((obj, True))
            children = obj.values() if isinstance(obj, dict) else obj
            work.extend((c, False) for c in children if isinstance(c, (dict, list, tuple)))


