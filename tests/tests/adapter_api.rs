//! The three adapters expose one API: the same client (`connect`, `connect_urls`, `publish`, `subscribe`,
//! `subscribe_many`, `unsubscribe`, `messages`, `on_message`, `state_changes`, `disconnect`)
//! and server (`start`, `addresses`, `subscribe`, `on_message`, `publish`, `wait`, `shutdown`) with the same argument and result types, the
//! async adapters as futures and mio blocking. This file fails to compile when one diverges:
//! each adapter's methods are bound, by one macro, to the exact types every adapter must have.

use mqtt_proto::{Publish, QoS, ReasonCode, Subscription, TopicFilter};
use mqtt_quic_core::driver::{
    ClientError, ClientOptions, ConnectionState, ServerAddresses, ServerError, ServerOptions,
};
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;

/// What an async adapter's call yields: its future's output.
fn awaited<T, F: Future<Output = T>>(_: F) -> PhantomData<T> {
    PhantomData
}

/// What a blocking adapter's call yields: the value itself.
fn returned<T>(value: T) -> PhantomData<T> {
    drop(value);
    PhantomData
}

/// Handles that are shared between threads and tasks, as every adapter's are.
fn shareable<T: Clone + Send + Sync + 'static>() {}
fn sendable<T: Send + 'static>() {}

/// Binds one adapter's client and server to the common signatures. `$yields` is [`awaited`]
/// for the async adapters and [`returned`] for mio.
macro_rules! adapter_api {
    ($check:ident, $krate:ident, $yields:ident) => {
        #[allow(clippy::too_many_arguments)]
        fn $check(
            client: $krate::client::Client,
            server: $krate::server::Server,
            url: &str,
            options: ClientOptions,
            server_options: ServerOptions,
            publish: Publish,
            filter: TopicFilter,
            subscriptions: Vec<Subscription>,
            filters: Vec<TopicFilter>,
        ) {
            use $krate::client::{Client, Messages, StateChanges};
            use $krate::server::Server;
            // The adapter's re-exports are the core's types, not look-alikes.
            let _: PhantomData<ClientOptions> = PhantomData::<$krate::client::ClientOptions>;
            let _: PhantomData<ClientError> = PhantomData::<$krate::client::ClientError>;
            let _: PhantomData<ConnectionState> = PhantomData::<$krate::client::ConnectionState>;
            let _: PhantomData<ServerOptions> = PhantomData::<$krate::server::ServerOptions>;
            let _: PhantomData<ServerError> = PhantomData::<$krate::server::ServerError>;
            shareable::<Client>();
            sendable::<Messages>();
            sendable::<StateChanges>();

            // The client.
            let _: PhantomData<Result<Client, ClientError>> = $yields(Client::connect(url, options.clone()));
            let urls = ["quic://a", "mqtt://a"];
            let _: PhantomData<Result<Client, ClientError>> = $yields(Client::connect_urls(urls, options));
            let _: PhantomData<Result<(), ClientError>> = $yields(client.publish(publish.clone()));
            let _: PhantomData<Result<QoS, ClientError>> = $yields(client.subscribe(filter.clone(), QoS::AtLeastOnce));
            let _: PhantomData<Result<Vec<ReasonCode>, ClientError>> = $yields(client.subscribe_many(subscriptions));
            let _: PhantomData<Result<Vec<ReasonCode>, ClientError>> = $yields(client.unsubscribe(filters));
            let messages: Option<Messages> = client.messages();
            let _: bool = client.on_message(|_: Publish| {});
            let mut changes: StateChanges = client.state_changes();
            let _: PhantomData<Option<ConnectionState>> = $yields(changes.recv());
            let _: PhantomData<Option<ConnectionState>> =
                $yields(changes.wait_for(|s: &ConnectionState| matches!(s, ConnectionState::Closed { .. })));
            if let Some(mut messages) = messages {
                let _: PhantomData<Option<Publish>> = $yields(messages.recv());
            }
            let _: ConnectionState = client.state();
            let _: &str = client.client_id();
            let _: PhantomData<Result<(), ClientError>> = $yields(client.disconnect());

            // The server.
            let _: PhantomData<Result<Server, ServerError>> = $yields(Server::start(server_options));
            let _: ServerAddresses = server.addresses();
            // In-process handlers.
            let _: PhantomData<Result<$krate::server::LocalMessages, ServerError>> =
                $yields(server.subscribe(filter.clone(), QoS::AtLeastOnce));
            let _: PhantomData<Result<(), ServerError>> =
                $yields(server.on_message(filter, QoS::AtMostOnce, |_: Publish| {}));
            let _: PhantomData<Result<(), ServerError>> = $yields(server.publish(publish));
            fn local_recv(messages: &mut $krate::server::LocalMessages) {
                let _: PhantomData<Option<Publish>> = $yields(messages.recv());
            }
            let _ = local_recv;
            let _: Option<SocketAddr> = server.quic_addr();
            let _: Option<SocketAddr> = server.tcp_addr();
            let mut server = server;
            let _: PhantomData<Result<(), ServerError>> = $yields(server.wait());
            let _: PhantomData<()> = $yields(server.shutdown());
        }
    };
}

adapter_api!(tokio_api, adapter_tokio, awaited);
adapter_api!(async_std_api, adapter_async_std, awaited);
adapter_api!(mio_api, adapter_mio, returned);

/// Compiling is the check; this names the bindings so that they are not dead code.
#[test]
fn every_adapter_has_the_same_client_and_server_api() {
    let _bound = (tokio_api, async_std_api, mio_api);
}
