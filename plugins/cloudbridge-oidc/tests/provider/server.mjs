// A real OpenID Provider (panva's oidc-provider) for the plugin's tests, on loopback only.
// Keys come from KEYS_FILE (a private JWKS written by the test), so a restart with other
// keys is a key rotation the test controls.
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const port = Number(process.env.PORT);
const issuer = `http://127.0.0.1:${port}`;
const jwks = JSON.parse(readFileSync(process.env.KEYS_FILE, 'utf8'));
const audience = 'cloudbridge-relay';

const provider = new Provider(issuer, {
  jwks,
  clients: [
    { // the CLI: a public client, no secret (RFC 8628)
      client_id: 'cloudbridge-cli', token_endpoint_auth_method: 'none',
      grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
      redirect_uris: [], response_types: [],
    },
    { // the relay's web console: authorization code with PKCE, at CONSOLE_REDIRECT_URI
      client_id: 'cloudbridge-console', token_endpoint_auth_method: 'none',
      grant_types: ['authorization_code'], response_types: ['code'],
      redirect_uris: process.env.CONSOLE_REDIRECT_URI ? [process.env.CONSOLE_REDIRECT_URI] : [],
    },
    { // a machine: client credentials
      client_id: 'cloudbridge-machine', client_secret: process.env.MACHINE_SECRET,
      grant_types: ['client_credentials'], redirect_uris: [], response_types: [],
      token_endpoint_auth_method: 'client_secret_basic',
    },
  ],
  scopes: ['openid', 'offline_access', 'mesh'],
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:cloudbridge:relay',
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'mesh', audience, accessTokenFormat: 'jwt',
        accessTokenTTL: Number(process.env.ACCESS_TOKEN_TTL || 300),
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  issueRefreshToken: (ctx, client) => client.grantTypeAllowed('refresh_token'),
  // people logging in to the relay's console are its admins; everyone else a client
  extraTokenClaims: (ctx, token) => ({
    'custom:tenant_id': 'acme',
    'custom:permissions': token.clientId === 'cloudbridge-console'
      ? ['relay:admin'] : ['relay:connect', 'tunnel:create', 'p2p:mesh'],
  }),
  pkce: { required: () => false },
  ttl: { DeviceCode: Number(process.env.DEVICE_CODE_TTL || 600) },
});
// What oidc-provider never does by itself but RFC 8628 allows, so that the client's
// handling is tested: a short polling interval, one slow_down, and a log of the polls and
// JWKS fetches for the test to read (GET /test/events); JWKS_MAX_AGE adds Cache-Control.
const events = [];
let slowDownSent = false;
provider.use(async (ctx, next) => {
  if (ctx.path === '/test/events') { ctx.body = events; return; }
  if (ctx.path === '/token' && ctx.method === 'POST') {
    events.push({ event: 'token', at: Date.now() / 1000 });
    if (process.env.SLOW_DOWN_ONCE && !slowDownSent) {
      slowDownSent = true;
      ctx.status = 400;
      ctx.body = { error: 'slow_down', error_description: 'polling too quickly' };
      return;
    }
  }
  await next();
  if (ctx.path === '/jwks') {
    events.push({ event: 'jwks', at: Date.now() / 1000 });
    if (process.env.JWKS_MAX_AGE) ctx.set('Cache-Control', `public, max-age=${process.env.JWKS_MAX_AGE}`);
  }
  if (ctx.path === '/device/auth' && ctx.status === 200 && process.env.POLL_INTERVAL) {
    ctx.body = { ...ctx.body, interval: Number(process.env.POLL_INTERVAL) };
  }
});
const server = provider.listen(port, '127.0.0.1', () => console.log(`READY ${issuer}`));
for (const s of ['SIGTERM', 'SIGINT']) process.on(s, () => server.close(() => process.exit(0)));
