//! The check every fuzzer of Kairos's input runs on one message: shared by
//! the property tests (`decode_fuzz.rs`) and the cargo-fuzz target
//! (`fuzz/fuzz_targets/decode.rs`).

use kairos_shared::contract::{raw_dead_letter_properties, Task};
use kairos_shared::record;
use lapin::protocol::basic::gen_properties;
use lapin::BasicProperties;

/// Wire-encodes properties, as a publisher would send them.
pub fn encode(props: &BasicProperties) -> Option<Vec<u8>> {
    cookie_factory::gen_simple(gen_properties(props), Vec::new()).ok()
}

/// What every consumer of the network does with one message: a task, or a
/// dead letter that can itself be published. Panics (failing the property)
/// only where Kairos would.
pub fn take(routing_key: &str, props: &BasicProperties, body: &[u8]) {
    match Task::decode(routing_key, props, body) {
        Ok(task) => {
            let out = task.publish_properties();
            assert!(encode(&out).is_some(), "publish properties must encode");
            let failed = task.with_failure_headers("boom", 1);
            assert!(encode(&failed).is_some(), "failure properties must encode");
            // A task either stores and reads back as the same task, or is
            // refused with a reason (then it is dead-lettered).
            match record::encode(&task) {
                Ok(rec) => {
                    let back = record::decode(&task.id, &rec).expect("a stored task reads back");
                    assert_eq!(back.name, task.name);
                    assert_eq!(back.queue, task.queue);
                    assert_eq!(back.body, task.body);
                    assert_eq!(back.attempt, task.attempt);
                    assert_eq!(back.priority, task.priority);
                }
                Err(err) => assert!(!err.to_string().is_empty()),
            }
        }
        Err(err) => {
            let reason = err.to_string();
            assert!(!reason.is_empty(), "a dead letter needs a reason");
            let dead = raw_dead_letter_properties(props, routing_key, &reason, 1);
            assert!(
                encode(&dead).is_some(),
                "dead-letter properties must encode"
            );
        }
    }
}
