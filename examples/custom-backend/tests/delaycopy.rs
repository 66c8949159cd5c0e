//! The example backend, through the public agent API: creation from outside the RIXL crates,
//! parameter validation, transfers completed from the backend's own thread, and deregistration
//! fenced by posts in flight (waiting for them, and giving up with `Timeout` past the agent's
//! bound while leaving the region registered).

use std::time::Duration;

use rixl::{
    Agent, AgentConfig, Desc, ErrorKind, MemType, Params, RegDesc, RegDescList, XferDescList,
    XferOp, XferOptions, XferStatus,
};
use rixl_example_backend::{FACTORY, NAME};

fn params(delay_us: u64) -> Params {
    [("delay_us".to_owned(), delay_us.to_string())].into()
}

fn agent(delay_us: u64, dereg_timeout: Duration) -> Agent {
    let a = Agent::new(
        "delaycopy-test",
        AgentConfig::default().deregister_timeout(dereg_timeout),
    )
    .expect("agent");
    assert_eq!(a.add_backend(&FACTORY, &params(delay_us)).expect("add"), 0);
    a
}

fn regs(bufs: &[&[u8]]) -> RegDescList {
    RegDescList::from_descs(
        MemType::Dram,
        bufs.iter()
            .map(|b| RegDesc::new(b.as_ptr() as u64, b.len() as u64, 0))
            .collect(),
    )
}

fn list(b: &[u8]) -> XferDescList {
    XferDescList::from_descs(
        MemType::Dram,
        vec![Desc::new(b.as_ptr() as u64, b.len() as u64, 0)],
    )
}

#[test]
fn moves_data_from_its_worker_thread() {
    let src = vec![7u8; 1 << 20];
    let dst = vec![0u8; 1 << 20];
    let a = agent(0, Duration::from_secs(10));
    // SAFETY: both vectors outlive the agent (declared before it) and are only read after the
    // transfer completed.
    unsafe { a.register_mem(&regs(&[&src, &dst]), &[]) }.expect("register");
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &list(&src),
            &list(&dst),
            "delaycopy-test",
            &XferOptions::default(),
        )
        .expect("create");
    assert_eq!(req.backend_name(), NAME);
    req.post().expect("post");
    assert_eq!(
        req.wait(Some(Duration::from_secs(10))).expect("wait"),
        XferStatus::Done
    );
    drop(req);
    drop(a);
    assert!(dst.iter().all(|&b| b == 7));
}

#[test]
fn parameters_are_validated_from_the_table() {
    let a = Agent::new("delaycopy-params", AgentConfig::default()).expect("agent");
    let e = a
        .add_backend(&FACTORY, &[("delay".to_owned(), "1".to_owned())].into())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidParam);
    assert!(e.to_string().contains("valid: delay_us"), "{e}");
    let e = a
        .add_backend(
            &FACTORY,
            &[("delay_us".to_owned(), "soon".to_owned())].into(),
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidParam);
    assert!(e.to_string().contains("0..=60000000"), "{e}");
    assert!(a.backends().is_empty());
    a.add_backend(&FACTORY, &Params::new()).expect("defaults");
    assert_eq!(a.backend_params(NAME).unwrap()["delay_us"], "0");
}

#[test]
fn registered_by_name_for_the_whole_process() {
    rixl::registry::add_factory(FACTORY).expect("add_factory");
    assert!(Agent::available_backends().contains(&NAME));
    assert_eq!(Agent::plugin_params(NAME).unwrap()["delay_us"], "0");
    assert_eq!(Agent::plugin_mem_types(NAME).unwrap(), vec![MemType::Dram]);
    let e = rixl::registry::add_factory(FACTORY).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidParam, "a name is taken once");
    let a = Agent::new("delaycopy-by-name", AgentConfig::default().backend(NAME)).expect("agent");
    assert_eq!(a.backends(), vec![NAME.to_owned()]);
}

#[test]
fn deregistration_waits_for_the_post_then_gives_up_past_its_bound() {
    let src = vec![3u8; 64 << 10];
    let dst = vec![0u8; 64 << 10];
    // A post takes 2 s; deregistration waits up to 100 ms (a wide margin, so that a loaded
    // machine pausing this thread cannot let the post finish first).
    let a = agent(2_000_000, Duration::from_millis(100));
    // SAFETY: both vectors outlive the agent and are read only once no post is in flight.
    unsafe { a.register_mem(&regs(&[&src, &dst]), &[]) }.expect("register");
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &list(&src),
            &list(&dst),
            "delaycopy-test",
            &XferOptions::default(),
        )
        .expect("create");
    assert_eq!(req.post().expect("post"), XferStatus::InProgress);
    let e = a.deregister_mem(&regs(&[&src]), &[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("stay valid"), "{e}");
    assert_eq!(
        req.status().expect("status"),
        XferStatus::InProgress,
        "the post goes on"
    );
    // The region is still registered and usable: the post completes and moves the data.
    assert_eq!(
        req.wait(Some(Duration::from_secs(10))).expect("wait"),
        XferStatus::Done
    );
    assert!(dst.iter().all(|&b| b == 3));
    // Once the post has ended, deregistration goes through, and the request is stale.
    a.deregister_mem(&regs(&[&src]), &[])
        .expect("deregister after the post");
    let e = req.post().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[test]
fn deregistration_waits_for_a_post_in_flight() {
    let src = vec![5u8; 64 << 10];
    let dst = vec![0u8; 64 << 10];
    let a = agent(100_000, Duration::from_secs(30));
    // SAFETY: as above.
    unsafe { a.register_mem(&regs(&[&src, &dst]), &[]) }.expect("register");
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &list(&src),
            &list(&dst),
            "delaycopy-test",
            &XferOptions::default(),
        )
        .expect("create");
    assert_eq!(req.post().expect("post"), XferStatus::InProgress);
    a.deregister_mem(&regs(&[&dst]), &[])
        .expect("deregistration waits");
    assert_eq!(
        req.status().expect("status"),
        XferStatus::Done,
        "it returned after the post"
    );
    assert!(dst.iter().all(|&b| b == 5));
}

#[test]
fn cancelled_post_moves_nothing_and_frees_the_region() {
    let src = vec![9u8; 64 << 10];
    let dst = vec![0u8; 64 << 10];
    // The worker wakes 2 s after the post (long after the cancel, even on a loaded machine).
    let a = agent(2_000_000, Duration::from_millis(50));
    // SAFETY: as above.
    unsafe { a.register_mem(&regs(&[&src, &dst]), &[]) }.expect("register");
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &list(&src),
            &list(&dst),
            "delaycopy-test",
            &XferOptions::default(),
        )
        .expect("create");
    req.post().expect("post");
    req.cancel().expect("cancel");
    assert_eq!(req.status().unwrap_err().kind(), ErrorKind::Canceled);
    a.deregister_mem(&regs(&[&dst]), &[])
        .expect("no post holds the region after cancel");
    // Past the worker's wake-up: it must have skipped the cancelled post.
    std::thread::sleep(Duration::from_millis(2300));
    assert!(dst.iter().all(|&b| b == 0), "a cancelled post wrote");
}
