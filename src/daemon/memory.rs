//! Keeping an idle daemon small. A reconcile allocates (git objects, plans, TLS sessions) on
//! whichever threads ran it; glibc keeps freed memory in per-thread arenas, resident, for
//! reuse. Between runs the daemon does nothing, so it hands that memory back.

/// At start: at most two malloc arenas, so the runtime's threads do not each hold one.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX takes any positive count.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// After a run: return free heap pages to the system (the top of each arena and whole free
/// pages inside it, which glibc's malloc_trim releases with MADV_DONTNEED).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
