//! Celery and BullMQ on the same servers, run on demand (`--peers`).
//! Each peer is a script under bench/peers/NAME that installs what it needs
//! under target/ on first use, runs W1 and W2(a), and prints one JSON object.

use crate::workloads::Ctx;

pub async fn run(ctx: &mut Ctx<'_>) {
    let _ = ctx;
}
