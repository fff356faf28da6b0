#![allow(clippy::unwrap_used)]
use floe_tests::netns::Lan;
use std::time::{Duration, Instant};

#[test]
fn explore() {
    let lan = Lan::new("lexp").unwrap();
    let (a, b, c, svc) = (&lan.a, &lan.b, &lan.c, lan.service_ip);
    lan.add_address(a, svc).unwrap();
    assert!(c.can_ping(svc).unwrap());
    eprintln!("before: {:?}", lan.neighbour(c, svc).unwrap());
    lan.del_address(a, svc).unwrap();
    lan.add_address(b, svc).unwrap();
    let t = Instant::now();
    loop {
        let ok = c.can_ping(svc).unwrap();
        eprintln!("{:>5.1}s ping={ok} {:?}", t.elapsed().as_secs_f64(), lan.neighbour(c, svc).unwrap());
        if ok || t.elapsed() > Duration::from_secs(90) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
