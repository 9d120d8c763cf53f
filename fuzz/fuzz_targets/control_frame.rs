//! Any bytes from a control-channel peer: frames or a clean error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshd_control::proto::{AgentMessage, FrameDecoder, MAX_AGENT_FRAME};

fuzz_target!(|data: &[u8]| {
    let mut dec = FrameDecoder::new(MAX_AGENT_FRAME);
    if dec.push(data).is_ok() {
        for _ in 0..64 {
            match dec.next_message::<AgentMessage>() {
                Ok(Some(_)) => continue,
                _ => break,
            }
        }
    }
});
