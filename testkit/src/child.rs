//! The fixtures' child processes (the agent, the operator): signals, and stopping with a bounded
//! wait, so a process that hangs on shutdown fails the caller instead of hanging it.

use std::{
    io,
    process::{Child, ExitStatus},
    time::{Duration, Instant},
};

/// Sends `signal` to `child`.
pub fn send_signal(child: &Child, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: plain kill(2); the child is ours and not reaped yet, so the pid still names it.
    if unsafe { libc::kill(child.id() as libc::pid_t, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `signal` to `child` and waits up to `patience` for it to exit; past that it is killed,
/// reaped, and the result is a `TimedOut` error.
pub fn signal_and_wait(
    mut child: Child,
    signal: libc::c_int,
    patience: Duration,
) -> io::Result<ExitStatus> {
    send_signal(&child, signal)?;
    let deadline = Instant::now() + patience;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("did not exit within {patience:?} of signal {signal}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
