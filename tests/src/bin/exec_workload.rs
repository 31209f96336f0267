//! A workload for the tests of what the agent does when its caller changes after connecting.
//!
//! - `exec_workload connect-then-exec SOCKET PROGRAM`: connects to the Workload API socket,
//!   waits until the agent has surely accepted the connection, then `exec`s PROGRAM with the
//!   connected socket (`PROGRAM fetch-fd FD`): the process that connected now runs another
//!   executable.
//! - `exec_workload fetch-fd FD`: one `FetchX509SVID` over the inherited socket FD; prints
//!   `ok ID,ID...` or `err CODE`.
//! - `exec_workload stream SOCKET`: takes supplementary group 4242 (needs root), then holds a
//!   `FetchX509SVID` stream, printing `msg ID,ID...` per message and `err CODE` at its end; a
//!   line `drop` on stdin drops the supplementary groups (prints `dropped`).
#![allow(
    unsafe_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "test helper: an inherited fd can only be adopted unsafely"
)]

use std::ffi::CString;
use std::io::Write as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::Duration;

use sigil_proto::workload::X509svidRequest;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::io::AsyncBufReadExt as _;
use tonic::transport::{Endpoint, Uri};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("connect-then-exec") => connect_then_exec(&args[2], &args[3]),
        Some("fetch-fd") => run(fetch_fd(args[2].parse().unwrap())),
        Some("stream") => run(stream(&args[2])),
        _ => panic!("usage: see the module docs"),
    }
}

fn run(future: impl Future<Output = ()>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future);
}

fn connect_then_exec(socket: &str, program: &str) {
    let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    // The agent accepts at once; give it ample time before the exec.
    std::thread::sleep(Duration::from_millis(500));
    nix::fcntl::fcntl(
        &stream,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let fd = stream.as_raw_fd();
    std::mem::forget(stream);
    let program = CString::new(program).unwrap();
    let args = [
        program.clone(),
        CString::new("fetch-fd").unwrap(),
        CString::new(fd.to_string()).unwrap(),
    ];
    // A copy another thread of the test just wrote may still be open for writing in a child
    // forked meanwhile (ETXTBSY until that child execs): retry a little.
    for _ in 0..100 {
        let err = nix::unistd::execv(&program, &args).unwrap_err();
        if err != nix::errno::Errno::ETXTBSY {
            panic!("exec failed: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("exec failed: the program stayed busy");
}

use sigil_proto::client::{SecurityHeader, WorkloadApiClient as Client, security_header};

async fn client_over(stream: tokio::net::UnixStream) -> Client {
    let mut stream = Some(stream);
    let channel = Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let stream = stream.take();
            async move {
                stream
                    .map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the inherited socket was used already"))
            }
        }))
        .await
        .unwrap();
    SpiffeWorkloadApiClient::with_interceptor(channel, security_header as SecurityHeader)
}

fn ids(msg: &sigil_proto::workload::X509svidResponse) -> String {
    msg.svids
        .iter()
        .map(|s| s.spiffe_id.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

async fn fetch_fd(fd: i32) {
    // SAFETY: the fd is the connected socket our parent image left open for us, and nothing
    // else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let std_stream = std::os::unix::net::UnixStream::from(owned);
    std_stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(std_stream).unwrap();
    let mut client = client_over(stream).await;
    match client.fetch_x509svid(X509svidRequest {}).await {
        Ok(response) => match response.into_inner().message().await {
            Ok(Some(msg)) => println!("ok {}", ids(&msg)),
            Ok(None) => println!("err end"),
            Err(status) => println!("err {:?}", status.code()),
        },
        Err(status) => println!("err {:?}", status.code()),
    }
}

async fn stream(socket: &str) {
    nix::unistd::setgroups(&[nix::unistd::Gid::from_raw(4242)]).unwrap();
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let mut client = client_over(stream).await;
    let mut messages = match client.fetch_x509svid(X509svidRequest {}).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            println!("err {:?}", status.code());
            return;
        }
    };
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            msg = messages.message() => {
                match msg {
                    Ok(Some(msg)) => println!("msg {}", ids(&msg)),
                    Ok(None) => { println!("err end"); return; }
                    Err(status) => { println!("err {:?}", status.code()); return; }
                }
            }
            line = stdin.next_line() => {
                match line.unwrap().as_deref() {
                    Some("drop") => {
                        nix::unistd::setgroups(&[]).unwrap();
                        println!("dropped");
                    }
                    Some(_) => {}
                    None => return,
                }
            }
        }
        std::io::stdout().flush().unwrap();
    }
}
