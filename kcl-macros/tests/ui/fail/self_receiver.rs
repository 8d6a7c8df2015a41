#[derive(serde::Deserialize)]
struct Order {}

struct Orders;

impl Orders {
    #[kcl::handler]
    async fn handle(&self, order: Order) {
        let _ = order;
    }
}

fn main() {}
