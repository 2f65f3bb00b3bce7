//! Order JSON as a client sends it (POST /orders bodies) and as the stores keep it: nothing may
//! panic, the nesting scan that guards the parser must agree with the parsed value, and the
//! order writer (stored order and view) with serde_json.

#![no_main]

use libfuzzer_sys::fuzz_target;
use order_process::api::limits::{depth, nests_deeper_than};
use order_process::order::{write_order, write_view, Order, OrderView};

fuzz_target!(|data: &[u8]| {
    for max in [0, 1, 8, 32] {
        let deep = nests_deeper_than(data, max);
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
            assert_eq!(deep, depth(&value) > max, "nesting scan disagrees at max {max}");
        }
    }
    // A stored order: whatever parses must render and read back the same.
    if let Ok(order) = serde_json::from_slice::<Order>(data) {
        let text = serde_json::to_string(&order).expect("an order serializes");
        let back: Order = serde_json::from_str(&text).expect("a serialized order parses");
        assert_eq!(back, order);
        let mut written = Vec::new();
        write_order(&mut written, &order).expect("the order writer writes an order");
        assert_eq!(written, text.as_bytes(), "the order writer and serde_json disagree");
        let view = serde_json::to_vec(&OrderView::from(&order)).expect("a view serializes");
        let mut written = Vec::new();
        write_view(&mut written, &order).expect("the order writer writes a view");
        assert_eq!(written, view, "the view writer and serde_json disagree");
        let _ = order_process::order::next_action(&order);
    }
});
