//! The CLI's few raw calls.

/// Blocks SIGINT, SIGTERM, SIGHUP and SIGQUIT in the calling thread (and
/// threads it starts later) and returns a guard that unblocks them. While a
/// process is frozen, floe must not die between injected syscalls: a
/// Ctrl-C then takes effect once the process is consistent again.
pub struct DeferTermination {
    old: libc::sigset_t,
}

impl DeferTermination {
    pub fn new() -> Self {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` and `old` are valid sigset_t for these calls.
        unsafe {
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        }
        Self { old }
    }
}

impl Drop for DeferTermination {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in new(); a pending signal is delivered now.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut());
        }
    }
}
