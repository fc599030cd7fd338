# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The ordering ring, compiled (same API and behaviour as `hotpath.ring`).

Everything is preallocated at construction: `capacity` item slots linked into
per-key chains (and, while free, into a free list), `capacity` key records
(there can never be more keys holding items than items held), and a circular
ready queue of record indexes. The only per-operation Python allocation is
the dict entry key -> record index, made when a key starts holding items and
dropped when it stops, so a key with nothing held leaves no trace.
"""

from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.ref cimport PyObject

from hotpath.vocabulary import bad_capacity, ring_repr

cdef extern from "Python.h":
    PyObject* PyDict_GetItemWithError(object d, object key) except? NULL

cdef enum:
    NIL = -1


cdef class OrderingRing:
    """Per-key FIFO, one item in flight per key, bounded capacity."""

    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _held          # queued + in flight
    cdef Py_ssize_t _in_flight
    cdef Py_ssize_t _keys          # records in use

    # Item slots: the item objects, and the next slot of the same key (or of the free list).
    cdef list _items
    cdef Py_ssize_t* _slot_next
    cdef Py_ssize_t _free_slot

    # Key records: head/tail of the key's queued chain, queued count, in-flight flag.
    cdef dict _record_of           # key -> record index (one of the preallocated ints)
    cdef tuple _record_ids         # the int objects 0..capacity-1, so the dict never allocates one
    cdef list _record_keys
    cdef Py_ssize_t* _head
    cdef Py_ssize_t* _tail
    cdef Py_ssize_t* _queued
    cdef char* _busy
    cdef Py_ssize_t _free_record   # free records are linked through _head

    # Ready queue: a circular buffer of record indexes; a record is in it at most once.
    cdef Py_ssize_t* _ready
    cdef Py_ssize_t _ready_start
    cdef Py_ssize_t _ready_len

    def __cinit__(self, capacity):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(bad_capacity(capacity))
        cdef Py_ssize_t cap = capacity
        cdef Py_ssize_t i
        self._capacity = cap
        self._items = [None] * cap
        self._record_keys = [None] * cap
        self._record_ids = tuple(range(cap))
        self._record_of = {}
        self._slot_next = <Py_ssize_t*>PyMem_Malloc(cap * sizeof(Py_ssize_t))
        self._head = <Py_ssize_t*>PyMem_Malloc(cap * sizeof(Py_ssize_t))
        self._tail = <Py_ssize_t*>PyMem_Malloc(cap * sizeof(Py_ssize_t))
        self._queued = <Py_ssize_t*>PyMem_Malloc(cap * sizeof(Py_ssize_t))
        self._ready = <Py_ssize_t*>PyMem_Malloc(cap * sizeof(Py_ssize_t))
        self._busy = <char*>PyMem_Malloc(cap * sizeof(char))
        if (self._slot_next == NULL or self._head == NULL or self._tail == NULL
                or self._queued == NULL or self._ready == NULL or self._busy == NULL):
            raise MemoryError()
        for i in range(cap):
            self._slot_next[i] = i + 1 if i + 1 < cap else NIL
            self._head[i] = i + 1 if i + 1 < cap else NIL
            self._tail[i] = NIL
            self._queued[i] = 0
            self._busy[i] = 0
        self._free_slot = 0
        self._free_record = 0

    def __dealloc__(self):
        PyMem_Free(self._slot_next)
        PyMem_Free(self._head)
        PyMem_Free(self._tail)
        PyMem_Free(self._queued)
        PyMem_Free(self._ready)
        PyMem_Free(self._busy)

    @property
    def capacity(self):
        return self._capacity

    def __len__(self):
        return self._held

    @property
    def in_flight(self):
        return self._in_flight

    @property
    def ready(self):
        return self._ready_len

    def is_full(self):
        return self._held >= self._capacity

    cdef inline void _make_ready(self, Py_ssize_t record):
        self._ready[(self._ready_start + self._ready_len) % self._capacity] = record
        self._ready_len += 1

    cpdef bint push(self, key, item) except -1:
        """Queue `item` behind the key's earlier items; False (nothing changes) when full."""
        cdef Py_ssize_t record, slot
        if self._held >= self._capacity:
            return False
        found = PyDict_GetItemWithError(self._record_of, key)
        if found is NULL:
            record = self._free_record
            self._free_record = self._head[record]
            self._record_of[key] = self._record_ids[record]
            self._record_keys[record] = key
            self._head[record] = NIL
            self._tail[record] = NIL
            self._keys += 1
        else:
            record = <Py_ssize_t><object>found
        slot = self._free_slot
        self._free_slot = self._slot_next[slot]
        self._items[slot] = item
        self._slot_next[slot] = NIL
        if self._tail[record] == NIL:
            self._head[record] = slot
        else:
            self._slot_next[self._tail[record]] = slot
        self._tail[record] = slot
        self._queued[record] += 1
        self._held += 1
        if self._queued[record] == 1 and not self._busy[record]:
            self._make_ready(record)
        return True

    cpdef pop(self):
        """The next ready (key, item), marking the key in flight; None when nothing is ready."""
        cdef Py_ssize_t record, slot
        if self._ready_len == 0:
            return None
        record = self._ready[self._ready_start]
        self._ready_start = (self._ready_start + 1) % self._capacity
        self._ready_len -= 1
        slot = self._head[record]
        item = self._items[slot]
        self._items[slot] = None
        self._head[record] = self._slot_next[slot]
        if self._head[record] == NIL:
            self._tail[record] = NIL
        # The slot is free again at once; the in-flight item still counts in _held
        # until complete(), which is what bounds the capacity.
        self._slot_next[slot] = self._free_slot
        self._free_slot = slot
        self._queued[record] -= 1
        self._busy[record] = 1
        self._in_flight += 1
        return (self._record_keys[record], item)

    def pop_many(self, Py_ssize_t n):
        """Up to `n` ready (key, item) pairs, in ready order."""
        cdef list batch = []
        while n > 0 and self._ready_len > 0:
            batch.append(self.pop())
            n -= 1
        return batch

    cpdef complete(self, key):
        """Release the key's in-flight item; its next queued item (if any) becomes ready."""
        cdef Py_ssize_t record
        found = PyDict_GetItemWithError(self._record_of, key)
        if found is NULL:
            raise KeyError(key)
        record = <Py_ssize_t><object>found
        if not self._busy[record]:
            raise KeyError(key)
        self._busy[record] = 0
        self._in_flight -= 1
        self._held -= 1
        if self._queued[record] > 0:
            self._make_ready(record)
        else:
            # A key with nothing held leaves no trace.
            del self._record_of[key]
            self._record_keys[record] = None
            self._head[record] = self._free_record
            self._free_record = record
            self._keys -= 1

    def pending(self, key):
        """Items held for `key`: queued plus the one in flight."""
        cdef Py_ssize_t record
        found = PyDict_GetItemWithError(self._record_of, key)
        if found is NULL:
            return 0
        record = <Py_ssize_t><object>found
        return self._queued[record] + self._busy[record]

    def _debug_counts(self):
        """Internal bookkeeping for leak checks in tests: keys tracked and free capacity.

        Walks the free lists, so a slot or record lost from them shows up here.
        """
        cdef Py_ssize_t free_slots = 0, free_records = 0, i = self._free_slot
        while i != NIL:
            free_slots += 1
            i = self._slot_next[i]
        i = self._free_record
        while i != NIL:
            free_records += 1
            i = self._head[i]
        return {
            "keys": len(self._record_of),
            "free": self._capacity - self._held,
            "free_slots": free_slots,
            "free_records": free_records,
            "records_in_use": self._keys,
        }

    def __repr__(self):
        return ring_repr(self._capacity, self._held, self._in_flight, self._ready_len)
