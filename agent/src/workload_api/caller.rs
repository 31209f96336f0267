//! Who is calling: the caller's kernel credentials and whether it is still the process that
//! connected, as the connection's listener learned them.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use sigil_attestors::unix::Credentials;

use super::peer::CallerProcess;

/// Who is calling, as the connection's listener learned it from the kernel.
pub trait CallerIdentity: Send + Sync + 'static {
    /// uid, gid and pid at connect time.
    fn credentials(&self) -> Credentials;
    /// True while the process that connected is still the one behind its pid (so a reused
    /// pid is never mistaken for it) and still runs the executable it ran when the connection
    /// was accepted (so a process that `exec`s after connecting is not attested as what it
    /// became).
    fn is_same_process(&self) -> bool;
    /// The process's `/proc/PID` directory, opened while it ran, when one is held: attestation
    /// reads through it (by path without one).
    fn proc_dir(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// The caller as the front door recorded it at accept: SO_PEERCRED plus a handle on the process
/// (a pidfd where the kernel offers one), so a reused pid is never mistaken for the caller.
impl CallerIdentity for CallerProcess {
    fn credentials(&self) -> Credentials {
        Credentials {
            uid: self.uid(),
            gid: self.gid(),
            pid: self.pid().and_then(|pid| i32::try_from(pid).ok()),
        }
    }

    fn is_same_process(&self) -> bool {
        self.still_alive_and_same() && self.same_executable()
    }

    fn proc_dir(&self) -> Option<BorrowedFd<'_>> {
        CallerProcess::proc_dir(self)
    }
}

/// Finds the caller in a request: a listener puts its connection info in the extensions.
pub type CallerLookup = fn(&tonic::Extensions) -> Option<Arc<dyn CallerIdentity>>;

/// The lookup for connections accepted by the front door
/// ([`WorkloadListener`](super::WorkloadListener)).
pub fn front_door_caller(extensions: &tonic::Extensions) -> Option<Arc<dyn CallerIdentity>> {
    extensions
        .get::<CallerProcess>()
        .map(|caller| Arc::new(caller.clone()) as Arc<dyn CallerIdentity>)
}
