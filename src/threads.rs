//! Work over many independent items (node files, nodes) spread on the machine's cores, with
//! the results in the items' order, so the output is the same as one item after the other
//! would give. Small inputs stay on the calling thread: starting threads would cost more.

/// Threads at most, whatever the machine: past this the merge of results dominates.
const MAX_THREADS: usize = 8;

/// `f` of every item with its index, in order, on up to one thread per core when there are
/// at least `per_thread` items for each.
pub(crate) fn map_in_order<T, R, F>(items: &[T], per_thread: usize, f: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(usize, &T) -> R + Sync,
{
    map_in_order_with(items, per_thread, |_| (), |_, i, t| f(i, t))
}

/// [`map_in_order`] where each thread first makes its own `state` with `init` (given the
/// thread's number, 0 for the first or only one): what the threads would otherwise share and
/// count references to on every use (a template environment's values) is then each thread's own.
pub(crate) fn map_in_order_with<T, S, R, I, F>(items: &[T], per_thread: usize, init: I, f: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    I: Fn(usize) -> S + Sync,
    F: Fn(&mut S, usize, &T) -> R + Sync,
{
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len() / per_thread.max(1))
        .clamp(1, MAX_THREADS);
    let run = |thread: usize, first: usize, part: &[T]| {
        let mut state = init(thread);
        part.iter()
            .enumerate()
            .map(|(i, t)| f(&mut state, first + i, t))
            .collect::<Vec<R>>()
    };
    if threads == 1 {
        return run(0, 0, items);
    }
    let chunk = items.len().div_ceil(threads);
    let run = &run;
    std::thread::scope(|scope| {
        let workers: Vec<_> = items
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| scope.spawn(move || run(c, c * chunk, part)))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::map_in_order;

    #[test]
    fn results_come_in_the_items_order_with_their_indexes_however_many_threads_run() {
        let items: Vec<u32> = (0..1000).collect();
        for per_thread in [1, 7, 64, 2000] {
            let out = map_in_order(&items, per_thread, |i, x| (i, x * 2));
            let expected: Vec<(usize, u32)> = items.iter().map(|x| (*x as usize, x * 2)).collect();
            assert_eq!(out, expected, "{per_thread} per thread");
        }
    }
}
