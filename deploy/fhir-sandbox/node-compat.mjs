// @medplum/core 5.2 reads WebSocket.CLOSING/CLOSED at module load (for its subscription client,
// which this server never uses). Node 22 has a global WebSocket; Node 20 does not, so give it
// the constants. This module must be imported before any @medplum package.
globalThis.WebSocket ??= class WebSocketUnavailable {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;

  constructor() {
    throw new Error('WebSocket is not available in this Node.js version');
  }
};
