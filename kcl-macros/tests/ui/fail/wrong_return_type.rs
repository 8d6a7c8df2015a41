#[derive(serde::Deserialize)]
struct Order {}

#[kcl::handler]
async fn handle(order: Order) -> bool {
    let _ = order;
    true
}

fn main() {}
