"""The permutation torch.sort produces on CPU, for JMP-exact neighbour ties.

JMP truncates neighbour lists with an unstable `torch.sort` (docs/graphs.md#max-neighbours-and-torch-sort).
On CPU that is libstdc++'s `std::sort` (introsort: median-of-three quicksort,
heapsort past the depth limit, insertion sort below 16 elements) over
(value, index) pairs compared by value only. When distances tie exactly at the
k-th slot (an atom's own +n / -n images in any symmetric crystal), which edges
survive depends on that algorithm. `introsort_permutation` replays it step by
step so that `tie_break="jmp"` reproduces JMP's graphs exactly; it runs only on
the rows where such a tie decides the result, so its Python cost is rare.
"""

from __future__ import annotations

import math
from typing import Sequence

_THRESHOLD = 16  # libstdc++ _S_threshold


def introsort_permutation(values: Sequence[float]) -> list[int]:
    """Indices of `values` in the order libstdc++ `std::sort` leaves them."""
    v = list(values)
    a = list(range(len(v)))
    n = len(a)
    if n < 2:
        return a

    def less(i: int, j: int) -> bool:
        return v[i] < v[j]

    def move_median_to_first(result: int, x: int, y: int, z: int) -> None:
        if less(a[x], a[y]):
            if less(a[y], a[z]):
                pick = y
            elif less(a[x], a[z]):
                pick = z
            else:
                pick = x
        elif less(a[x], a[z]):
            pick = x
        elif less(a[y], a[z]):
            pick = z
        else:
            pick = y
        a[result], a[pick] = a[pick], a[result]

    def unguarded_partition(first: int, last: int, pivot: int) -> int:
        while True:
            while less(a[first], a[pivot]):
                first += 1
            last -= 1
            while less(a[pivot], a[last]):
                last -= 1
            if not first < last:
                return first
            a[first], a[last] = a[last], a[first]
            first += 1

    def adjust_heap(first: int, hole: int, length: int, value: int) -> None:
        top = hole
        child = hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if less(a[first + child], a[first + child - 1]):
                child -= 1
            a[first + hole] = a[first + child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            a[first + hole] = a[first + child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and less(a[first + parent], value):
            a[first + hole] = a[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        a[first + hole] = value

    def heap_sort(first: int, last: int) -> None:  # std::partial_sort(first, last, last)
        length = last - first
        if length >= 2:
            parent = (length - 2) // 2
            while True:
                adjust_heap(first, parent, length, a[first + parent])
                if parent == 0:
                    break
                parent -= 1
        while last - first > 1:
            last -= 1
            value = a[last]
            a[last] = a[first]
            adjust_heap(first, 0, last - first, value)

    def introsort_loop(first: int, last: int, depth: int) -> None:
        while last - first > _THRESHOLD:
            if depth == 0:
                heap_sort(first, last)
                return
            depth -= 1
            move_median_to_first(first, first + 1, first + (last - first) // 2, last - 1)
            cut = unguarded_partition(first + 1, last, first)
            introsort_loop(cut, last, depth)
            last = cut

    def linear_insert(i: int) -> None:
        value = a[i]
        j = i
        while less(value, a[j - 1]):
            a[j] = a[j - 1]
            j -= 1
        a[j] = value

    def insertion_sort(first: int, last: int) -> None:
        for i in range(first + 1, last):
            if less(a[i], a[first]):
                value = a[i]
                a[first + 1 : i + 1] = a[first:i]
                a[first] = value
            else:
                linear_insert(i)

    introsort_loop(0, n, 2 * int(math.floor(math.log2(n))))
    if n > _THRESHOLD:
        insertion_sort(0, _THRESHOLD)
        for i in range(_THRESHOLD, n):
            linear_insert(i)
    else:
        insertion_sort(0, n)
    return a
