//! Raw bytes on one connection of the real edge (socket wrapper, hyper's HTTP/1.1
//! server with the edge's settings, router, handlers) with an in-memory stand-in for
//! Kafka: no panic, and the answers are what `Exchange::check` says the edge promises.
//! A first byte 0x01 / 0x02 makes the stand-in answer "queue full" / "unavailable".
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tally_ingest::offline::{self, OfflineEdge};

/// One runtime for every input, with tokio's paused clock: timeouts fire as soon as
/// nothing else can run.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime")
});

static EDGE: LazyLock<OfflineEdge> =
    LazyLock::new(|| OfflineEdge::new(offline::fuzz_config()).expect("offline edge"));

fuzz_target!(|data: &[u8]| {
    let (mode, input) = offline::split_stand_in_mode(data);
    let exchange = RUNTIME.block_on(async {
        EDGE.set_stand_in(mode);
        EDGE.exchange(input).await
    });
    if let Err(problem) = exchange.check() {
        panic!(
            "{problem}\ninput: {:?}\noutput: {:?}",
            String::from_utf8_lossy(data),
            String::from_utf8_lossy(&exchange.output)
        );
    }
});
