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

/// In a run's worker: cap the address space, so a run that would grow without bound (a
/// template or YAML that expands, a huge answer from a node) fails its allocation and ends,
/// instead of taking the host's memory. The daemon reports such a run as failed.
pub fn limit_address_space(bytes: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct it is given and changes only this process's limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
