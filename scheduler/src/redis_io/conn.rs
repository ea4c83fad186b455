//! The Redis pool and the kept connection live in `kairos_shared::redis`
//! (the worker uses them too); re-exported here for the scheduler's code.

pub use kairos_shared::redis::{
    client, no_reply, pool, redis_pool, RedisConn, RedisConnection, RedisPool, RedisSetupError,
};
