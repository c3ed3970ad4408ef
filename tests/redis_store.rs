//! The Redis store against a real `redis-server`: its time bound, its error messages, and
//! scripts that write nothing when they refuse.

mod common;

use common::*;

#[test]
fn a_redis_that_loses_its_port_race_is_not_taken_for_another_tests() {
    let first = RedisServer::start();
    // A second server on the same port cannot bind; the first one answers its PING.
    match RedisServer::start_on(first.port) {
        Ok(second) => panic!(
            "a server on the taken port {} was taken for the running one",
            second.port
        ),
        Err(why) => assert!(
            why.contains("another server") || why.contains("exited"),
            "{why}"
        ),
    }
}
